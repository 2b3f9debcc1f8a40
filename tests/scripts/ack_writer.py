#!/usr/bin/python3
# Durability acceptance item (tests/tests/durability.rs): an acknowledged
# write must survive a crash (SIGKILL) of triremed.
#
# Writes 4 KiB blocks with libnbd, asynchronously (aio_pwrite, INFLIGHT in
# flight), each to a DISTINCT block index 0, 1, 2, ... with a unique pattern
# derived from (block index, seed). Every write whose completion reports
# success has its block index appended to RECORD_FILE, one per line, flushed
# after each line. Runs until MAX_BLOCKS are written or the connection fails
# (the server being killed), then exits. Exit status: 0 when all blocks were
# written, 3 when the connection failed (the expected case in the test).
#
# usage: ack_writer.py URI RECORD_FILE SEED [INFLIGHT] [MAX_BLOCKS]
#
# Must run under /usr/bin/python3 (libnbd's `nbd` module).

import os
import sys

import nbd

from blockpattern import BLOCK, block_pattern


def main():
    uri, record_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    inflight = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    max_blocks = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 18

    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    max_blocks = min(max_blocks, size // BLOCK)

    record = open(record_path, "w")
    pending = {}  # cookie -> (block index, buffer kept alive until completion)
    next_block = 0
    acked = 0
    failed = 0
    status = 0
    try:
        while True:
            while len(pending) < inflight and next_block < max_blocks:
                buf = nbd.Buffer.from_bytearray(block_pattern(next_block, seed))
                cookie = h.aio_pwrite(buf, next_block * BLOCK)
                pending[cookie] = (next_block, buf)
                next_block += 1
            if not pending:
                break
            h.poll(-1)
            while pending:
                cookie = h.aio_peek_command_completed()
                if cookie <= 0:
                    break
                index, _ = pending.pop(cookie)
                try:
                    ok = h.aio_command_completed(cookie)
                except nbd.Error:
                    ok = False
                if ok:
                    record.write("%d\n" % index)
                    record.flush()
                    acked += 1
                else:
                    failed += 1
    except nbd.Error as e:
        # The server went away (expected: the test SIGKILLs it).
        print("ack_writer: connection error: %s" % e, file=sys.stderr)
        status = 3
    record.flush()
    os.fsync(record.fileno())
    record.close()
    print(
        "ack_writer: issued=%d acked=%d failed=%d unfinished=%d"
        % (next_block, acked, failed, len(pending)),
        file=sys.stderr,
    )
    if status == 0:
        try:
            h.shutdown()
        except nbd.Error:
            pass
    return status


if __name__ == "__main__":
    sys.exit(main())
