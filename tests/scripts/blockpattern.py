"""The block pattern shared by ack_writer.py and verify_blocks.py: unique per
(seed, block index), so a block holding another block's data, stale data or
zeroes is caught."""

import hashlib

BLOCK = 4096


def block_pattern(index, seed):
    digest = hashlib.sha256(("%d:%d" % (seed, index)).encode()).digest()
    return digest * (BLOCK // len(digest))
