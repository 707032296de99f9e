"""CRC-32 checks of what is read: lanes of threads that fold records' pieces into their checksums while the data is
used (``CrcLanes``), and the CRC-32 of bytes one after the other from the CRC-32s of their parts (``crc32_combine``),
for a record read in pieces on several threads."""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import timings

# Threads that check CRC-32s (about 1-3 GB/s each with zlib): one record's pieces are folded in order on one of
# them, consecutive records on different ones, so that the checks keep up with reads from the page cache.
CRC_LANES = max(1, min(4, os.cpu_count() or 1))


class CrcLanes:
    """Folds pieces of records into their CRC-32s on worker threads ("lanes"): a record's pieces in submission order
    on the lane it was given at its first piece, consecutive records on different lanes. ``wait`` collects the
    verdicts of what was submitted so far."""

    def __init__(self, lanes: int = CRC_LANES) -> None:
        self.lanes = lanes
        self._workers: list[ThreadPoolExecutor] = []
        self._turn = 0
        self._lane_of: dict[tuple[Path, int], ThreadPoolExecutor] = {}
        self._state: dict[tuple[Path, int], int] = {}  # record -> CRC-32 of its pieces so far
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def submit(self, key: tuple[Path, int], data: memoryview, first: bool, last: bool, check: Any, done: Any) -> None:
        """Fold ``data`` into record ``key``'s CRC-32; after its ``last`` piece call ``check(crc)``; then ``done()``
        (the piece may be reused)."""

        def step() -> None:
            try:
                with timings.timed("reading"):
                    crc = zlib.crc32(data, 0 if first else self._state[key])
                if last:
                    self._state.pop(key, None)
                    check(crc)
                else:
                    self._state[key] = crc
            finally:
                done()

        self._pending.append(self._lane(key, first, last).submit(step))

    def _lane(self, key: tuple[Path, int], first: bool, last: bool) -> ThreadPoolExecutor:
        with self._lock:
            lane = self._lane_of.get(key) if not first else None
            if lane is None:
                if len(self._workers) < self.lanes:
                    self._workers.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt2hf-crc"))
                lane = self._workers[self._turn % len(self._workers)]
                self._turn += 1
            if last:
                self._lane_of.pop(key, None)
            else:
                self._lane_of[key] = lane
            return lane

    def wait(self) -> None:
        """Wait for the pieces submitted so far; raise the first check's error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        for worker in self._workers:
            worker.shutdown(wait=True, cancel_futures=True)
        self._workers.clear()
        self._lane_of.clear()


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of two byte strings one after the other, from their CRC-32s and the second one's length (zlib's
    ``crc32_combine``, which Python's zlib does not offer): a tensor's checksum from pieces checked on several
    threads."""
    operator = [0xEDB88320] + [1 << n for n in range(31)]  # appends one zero bit to a CRC-32
    for _ in range(3):
        operator = _gf2_square(operator)  # one zero byte
    while len2 > 0:  # append len2 zero bytes to crc1: the operator for 2**k bytes at each set bit k of len2
        if len2 & 1:
            crc1 = _gf2_times(operator, crc1)
        len2 >>= 1
        if len2:
            operator = _gf2_square(operator)
    return crc1 ^ crc2
