"""The pages a server served recently, shared by its workers: what ``POST /feedback`` checks events
against before the decision row is even written.

A fixed table in a memory-mapped file (``$HOMEPAGE_DATA_DIR/served-pages.bin``), one record per page
at the slot its request id hashes to (a newer page evicts an older one there): the request id's
64-bit hash, the page's slot count, a 2048-bit Bloom filter of its (slot, item) pairs, and a checksum
over all of it. Lookups never refuse wrongly: a Bloom filter has no false negatives, and a record
that is being overwritten or was torn fails its checksum and reads as "page unknown", which the
route accepts. A pair that was not shown passes the filter with probability about 1e-5 (60 pairs,
7 hashes; 0.7 % with 200 pairs on a page), so almost every wrong item is caught.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ServedPages"]

_BITS = 2048
_HASHES = 7
_WORDS = 3 + _BITS // 64  # key, slot count, checksum, filter
#: filter bit b as a bit of the filter's little-endian integer (the table stores ``np.packbits`` order:
#: bit b is bit 7 - b % 8 of byte b // 8)
_BIT_OF = [1 << (8 * (b // 8) + 7 - b % 8) for b in range(_BITS)]
#: (slot, item) filters kept per table: a page's 60 pairs are then a few dictionary lookups, not 60
#: digests; a catalog of 3,000 items in 6 slots needs 18k (about 5 MB)
_MAX_CACHED = 1 << 16


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _positions(slots: list[int], items: list[str]) -> np.ndarray:
    """Shape (n, _HASHES): the filter bits of each (slot, item) pair, from independent 16-bit pieces of
    one digest (double hashing modulo a power of two gives ten times the false positives here)."""
    d = b"".join(hashlib.blake2b(f"{s}\x1f{i}".encode(), digest_size=16).digest() for s, i in
                 zip(slots, items, strict=True))
    pieces = np.frombuffer(d, dtype="<u2").reshape(-1, 8)[:, :_HASHES]
    return (pieces.astype(np.int64) % _BITS).reshape(-1, _HASHES)


class ServedPages:
    """Recently served pages by request id, in a file shared by the server's workers (or in this
    process's memory alone when ``path`` is None or cannot be mapped).

    Parameters
    ----------
    path
        The table's file; created (``capacity`` records of 280 bytes) when missing.
    capacity
        Records in the table: about the last ``capacity`` pages are known (2**16: 18 MiB).
    """

    def __init__(self, path: Path | None = None, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        size = capacity * _WORDS * 8
        self._mm: mmap.mmap | None = None
        if path is not None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_size != size:
                        os.ftruncate(fd, size)
                    self._mm = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            except OSError:
                self._mm = None
        self.shared = self._mm is not None
        buf: Any = self._mm if self._mm is not None else bytearray(size)
        self._table = np.frombuffer(buf, dtype=np.uint64).reshape(capacity, _WORDS)
        self._lock = threading.Lock()
        self._masks: dict[tuple[int, str], int] = {}

    @staticmethod
    def _checksum(row: np.ndarray) -> np.uint64:
        return np.uint64(_h64(row[0:2].tobytes() + row[3:].tobytes()))

    def _key(self, request_id: str) -> tuple[np.uint64, int]:
        key = _h64(request_id.encode()) | 1  # never 0: 0 marks an empty record
        return np.uint64(key), key % self.capacity

    def add(self, request_id: str, modules: list[dict[str, Any]]) -> None:
        """Record a served page (``modules`` as the layout response has them)."""
        pairs = [(int(m["slot"]), str(it["item_id"])) for m in modules for it in m["items"]]
        masks = self._masks
        new = [p for p in dict.fromkeys(pairs) if p not in masks]
        if new:
            if len(masks) + len(new) > _MAX_CACHED:
                masks.clear()
            for p, pos in zip(new, _positions([s for s, _ in new], [i for _, i in new]).tolist(), strict=True):
                masks[p] = sum({_BIT_OF[b] for b in pos})
        bits = 0
        for p in pairs:
            bits |= masks[p]
        key, at = self._key(request_id)
        head = int(key).to_bytes(8, "little") + len(modules).to_bytes(8, "little")
        body = bits.to_bytes(_BITS // 8, "little")
        row = np.frombuffer(head[8:] + _h64(head + body).to_bytes(8, "little") + body, dtype="<u8")
        with self._lock:  # other processes may write the same record: the checksum catches that
            self._table[at, 0] = 0
            self._table[at, 1:] = row
            self._table[at, 0] = key

    def check(self, request_id: str, slots: list[int], items: list[str]) -> tuple[int | None, np.ndarray | None]:
        """The page's slot count and, per event, whether its item was shown in its slot; (None, None)
        when the page is not known (not served here, evicted, or being rewritten)."""
        key, at = self._key(request_id)
        row = self._table[at].copy()
        if row[0] != key or row[2] != self._checksum(row):
            return None, None
        bits = np.unpackbits(row[3:].view(np.uint8)).astype(bool)
        return int(row[1]), bits[_positions(slots, items)].all(axis=1)
