#!/usr/bin/python3
# Durability acceptance item (tests/tests/durability.rs): an acknowledged
# write must survive a crash (SIGKILL) of triremed.
#
# Also the writer of the replication acceptance tests
# (tests/tests/replication.rs): a leader is SIGKILLed while it writes through
# a surviving node, which must show as a pause, never as an error.
#
# Writes 4 KiB blocks with libnbd, asynchronously (aio_pwrite, INFLIGHT in
# flight), each to a DISTINCT block index 0, 1, 2, ... with a unique pattern
# derived from (block index, seed). Every write whose completion reports
# success has its block index appended to RECORD_FILE, one per line, flushed
# after each line. Runs until MAX_BLOCKS are written, the stop file appears
# (--stop-file: no new writes are issued, the ones in flight are awaited) or
# the connection fails (the server being killed), then exits.
#
# With --timestamps each record line is "INDEX SECONDS", SECONDS being
# time.monotonic() when the completion was seen (CLOCK_MONOTONIC, the clock
# of Rust's Instant), so a test can measure pauses between acknowledgements.
#
# Exit status: 0 when every issued write succeeded, 3 when the connection
# failed (the expected case in the durability test), 4 when the connection
# stayed up but some write completed with an error.
#
# usage: ack_writer.py [--stop-file PATH] [--timestamps]
#                      URI RECORD_FILE SEED [INFLIGHT] [MAX_BLOCKS]
#
# Must run under /usr/bin/python3 (libnbd's `nbd` module).

import argparse
import os
import sys
import time

import nbd

from blockpattern import BLOCK, block_pattern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stop-file", default=None)
    ap.add_argument("--timestamps", action="store_true")
    ap.add_argument("uri")
    ap.add_argument("record_file")
    ap.add_argument("seed", type=int)
    ap.add_argument("inflight", type=int, nargs="?", default=16)
    ap.add_argument("max_blocks", type=int, nargs="?", default=1 << 18)
    args = ap.parse_args()
    uri, record_path, seed = args.uri, args.record_file, args.seed
    inflight, max_blocks = args.inflight, args.max_blocks
    stop_file = args.stop_file

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
    stopped = False
    try:
        while True:
            if stop_file is not None and not stopped and os.path.exists(stop_file):
                stopped = True
            while not stopped and len(pending) < inflight and next_block < max_blocks:
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
                    if args.timestamps:
                        record.write("%d %.6f\n" % (index, time.monotonic()))
                    else:
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
        "ack_writer: issued=%d acked=%d failed=%d unfinished=%d stopped=%s"
        % (next_block, acked, failed, len(pending), stopped),
        file=sys.stderr,
    )
    if status == 0 and failed > 0:
        status = 4
    if status != 3:
        try:
            h.shutdown()
        except nbd.Error:
            pass
    return status


if __name__ == "__main__":
    sys.exit(main())
