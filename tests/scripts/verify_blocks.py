#!/usr/bin/python3
# Durability acceptance item (tests/tests/durability.rs): after a crash and
# restart, every block recorded as acknowledged by ack_writer.py must read
# back with exactly the pattern that was written.
#
# Reads every block index listed in RECORD_FILE (one per line; anything after
# the index on a line, such as ack_writer.py's timestamp, is ignored) and compares
# it with the pattern derived from (block index, seed). Prints one JSON line
# {"verified": N, "mismatches": M, "examples": [...]} on stdout.
# Exit status 0 when there are no mismatches and N > 0, 1 otherwise.
#
# usage: verify_blocks.py URI RECORD_FILE SEED
#
# Must run under /usr/bin/python3 (libnbd's `nbd` module).

import json
import sys

import nbd

from blockpattern import BLOCK, block_pattern

INFLIGHT = 32


def main():
    uri, record_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    indexes = []
    with open(record_path) as f:
        for line in f:
            line = line.strip()
            if line:
                indexes.append(int(line.split()[0]))
    duplicates = len(indexes) - len(set(indexes))

    h = nbd.NBD()
    h.connect_uri(uri)
    verified = 0
    mismatches = 0
    examples = []

    def check(index, got):
        nonlocal verified, mismatches
        if got == block_pattern(index, seed):
            verified += 1
        else:
            mismatches += 1
            if len(examples) < 10:
                zero = got == bytes(BLOCK)
                examples.append({"block": index, "all_zero": zero, "head": got[:16].hex()})

    # Reads are pipelined (INFLIGHT at once): every read of a replica is a
    # ReadIndex round, so one at a time would be slow. A failed read raises
    # nbd.Error and fails the script.
    pending = {}  # cookie -> (block index, buffer)
    todo = iter(indexes)
    exhausted = False
    while True:
        while not exhausted and len(pending) < INFLIGHT:
            index = next(todo, None)
            if index is None:
                exhausted = True
                break
            buf = nbd.Buffer(BLOCK)
            pending[h.aio_pread(buf, index * BLOCK)] = (index, buf)
        if not pending:
            break
        h.poll(-1)
        while pending:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            index, buf = pending.pop(cookie)
            h.aio_command_completed(cookie)
            check(index, bytes(buf.to_bytearray()))
    h.shutdown()
    print(json.dumps({
        "records": len(indexes),
        "duplicates": duplicates,
        "verified": verified,
        "mismatches": mismatches,
        "examples": examples,
    }))
    return 0 if mismatches == 0 and duplicates == 0 and verified > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
