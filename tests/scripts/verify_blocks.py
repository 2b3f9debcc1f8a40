#!/usr/bin/python3
# Durability acceptance item (tests/tests/durability.rs): after a crash and
# restart, every block recorded as acknowledged by ack_writer.py must read
# back with exactly the pattern that was written.
#
# Reads every block index listed in RECORD_FILE (one per line) and compares
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


def main():
    uri, record_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    indexes = []
    with open(record_path) as f:
        for line in f:
            line = line.strip()
            if line:
                indexes.append(int(line))
    duplicates = len(indexes) - len(set(indexes))

    h = nbd.NBD()
    h.connect_uri(uri)
    verified = 0
    mismatches = 0
    examples = []
    for index in indexes:
        got = h.pread(BLOCK, index * BLOCK)
        if bytes(got) == block_pattern(index, seed):
            verified += 1
        else:
            mismatches += 1
            if len(examples) < 10:
                zero = got == bytes(BLOCK)
                examples.append({"block": index, "all_zero": zero, "head": bytes(got[:16]).hex()})
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
