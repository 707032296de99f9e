"""Where a conversion's time went: seconds per stage, for ``convert --json`` and the debug log.

The stages, in the order they begin:

- ``importing``: torch, transformers and PEFT (from the process's start, for the command line);
- ``planning``: opening the run (metadata only), the plan, settling what only data can tell;
- ``reading``: reading the sources' tensor bytes and checking their CRC-32s;
- ``merging``: merging units with PEFT on the merge device, and the casts to the output dtypes;
- ``copying``: gathering the output tensors' bytes into the writers' aligned staging buffers;
- ``writing``: writing the staging buffers to the safetensors files and flushing them to disk;
- ``hashing``: the sha256 of every file written (and of the source with ``--source-sha256``);
- ``verifying``: the checks against the unmerged model and of what was written.

Reading, copying, writing and hashing run on threads of their own beside the converting thread, so the stages
overlap: each figure is the seconds that stage was busy (summed over its threads), and together they add up to more
than ``total``, the wall time. ``waiting_for_reads`` and ``waiting_for_writes`` are the converting thread's seconds
spent waiting for the read-ahead and for the writers' copiers; ``waiting_for_disk`` is the copiers' seconds spent
waiting for a staging buffer that the disk or the hasher still holds: the stage waited for is the one that bounds
the conversion.

One conversion at a time per process records (``recording``); outside one, ``timed`` and ``add`` cost a clock read
and record nothing. With ``CKPT2HF_TRACE=<file>`` in the environment, every timed block is also written to that file
at the end, thread by thread, in the Trace Event format that Perfetto and chrome://tracing show: which stage waited
for which, over time. This module must not import torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

from .names import TRACE

log = logging.getLogger(__name__)

STAGES = ("importing", "planning", "reading", "merging", "copying", "writing", "hashing", "verifying")
WAITS = ("waiting_for_reads", "waiting_for_writes", "waiting_for_disk")


class Timings:
    """Seconds per stage of one conversion (thread-safe)."""

    def __init__(self, started: float | None = None, trace: bool = False) -> None:
        self.started = time.perf_counter() if started is None else started
        self.seconds = dict.fromkeys((*STAGES, *WAITS), 0.0)
        self.events: list[tuple[str, str, float, float]] | None = [] if trace else None  # stage, thread, start, s
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, start: float | None = None) -> None:
        with self._lock:
            self.seconds[stage] += seconds
            if self.events is not None and start is not None:
                thread = threading.current_thread()
                self.events.append((stage, f"{thread.name} {thread.ident}", start, seconds))

    def write_trace(self, path: str) -> None:
        """The timed blocks as Trace Event "complete" events, microseconds from ``started``, a track per thread."""
        with self._lock:
            events = list(self.events or ())
        threads = {name: i for i, name in enumerate(dict.fromkeys(thread for _, thread, _, _ in events))}
        trace = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": i, "args": {"name": name}}
                 for name, i in threads.items()]  # fmt: skip
        trace += [
            {"ph": "X", "name": stage, "pid": 1, "tid": threads[thread], "ts": round((start - self.started) * 1e6),
             "dur": round(seconds * 1e6)}
            for stage, thread, start, seconds in events
        ]  # fmt: skip
        with open(path, "w") as fh:
            json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, fh)

    def record(self) -> dict[str, float]:
        """Each stage's seconds, then ``total`` (wall seconds since ``started``), rounded to microseconds (hashing
        a small export's files takes a fraction of a millisecond)."""
        with self._lock:
            figures = {stage: round(s, 6) for stage, s in self.seconds.items()}
        figures["total"] = round(time.perf_counter() - self.started, 6)
        return figures


_current: Timings | None = None


def add(stage: str, seconds: float, start: float | None = None) -> None:
    """Count ``seconds`` to ``stage`` of the conversion recording now (none: nothing); ``start``: when they began
    (``perf_counter``), for the trace."""
    current = _current
    if current is not None:
        current.add(stage, seconds, start)


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    """Count the wall time of the block to ``stage``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        add(stage, time.perf_counter() - started, started)


@contextlib.contextmanager
def recording(started: float | None = None, importing: float = 0.0) -> Iterator[Timings]:
    """Record the stages of the conversion run inside the block (``started``: when it began, by ``perf_counter``;
    ``importing``: seconds spent importing before it); the debug log gets the figures at the end."""
    global _current
    trace = os.environ.get(TRACE)
    previous, _current = _current, Timings(started, trace=bool(trace))
    _current.add("importing", importing, _current.started)
    try:
        yield _current
    finally:
        timings, _current = _current, previous
        log.debug("seconds per stage: %s", ", ".join(f"{k} {v:.2f}" for k, v in timings.record().items()))
        if trace:
            timings.write_trace(trace)


def since_process_start() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot (field 22, counted after the comm field)
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
