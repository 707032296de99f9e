"""Where a migration's conversions run: in this process one after another, in ``--jobs`` processes on this host, or
as tasks on a Ray cluster. Each returns the results in the order of the tasks it was given; each conversion is
``migration.convert_task``, which records its run under the out-root whatever runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from . import ledger
from .errors import ConvertError
from .ledger import FAILED, RunResult
from .migration import RunTask, check_task, convert_task

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
PROCESS_ROUNDS = 3  # pools a --jobs migration starts at most, when a worker dies
RAY_RETRIES = 3  # a Ray task lost with its worker or node is run again this many times


def _lost(task: RunTask, message: str) -> RunResult:
    """A run whose conversion ended with its process: failed, recorded by the process that saw it end."""
    result = ledger.stamped(RunResult(task.options.run, task.options.out, FAILED, message), task.shard)
    ledger.write(task.out_root, result)
    return result


def _announce(i: int, total: int, result: RunResult) -> None:
    log.info("[%d/%d] %s: %s", i, total, result.run, result.status)


def in_turn(tasks: Sequence[RunTask]) -> list[RunResult]:
    """One conversion after another, in this process."""
    results = []
    for i, task in enumerate(tasks, 1):
        log.info("[%d/%d] %s -> %s", i, len(tasks), task.options.run, task.options.out)
        results.append(convert_task(task))
    return results


def _gpus(tasks: Sequence[RunTask]) -> int:
    """GPUs the conversions may use: none when they merge on the CPU."""
    if all(t.options.device == "cpu" for t in tasks):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


_SLOTS: Any = None  # the worker's queue of slots, set by _start_worker


def _start_worker(slots: Any, locks: Sequence[Any], gpus: int, threads: int, level: int) -> None:
    """A ``--jobs`` worker takes a slot: slot k merges on GPU k mod the GPUs (the only one it sees), and the workers
    that share a GPU take turns on it (``pipeline.share_device``); its torch threads are its share of the cores."""
    slot = slots.get()
    logging.basicConfig(level=level, format=f"%(levelname)s [job {slot + 1}] %(message)s")
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    import torch

    from . import pipeline

    torch.set_num_threads(threads)
    if gpus and locks:
        pipeline.share_device(locks[slot % gpus])


def _forkserver() -> Any:
    """The context of the ``--jobs`` workers, its server started now if it is not running. The workers fork from one
    server process that imported what a conversion imports (``preload``) once and ran nothing (no CUDA, no thread
    pools: safe to fork), so they do not each pay the imports; started before the runs are checked, it imports
    while this process does."""
    import multiprocessing
    import multiprocessing.forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["converter.preload"])
    multiprocessing.forkserver.ensure_running()
    return context


def in_processes(tasks: Sequence[RunTask], jobs: int) -> list[RunResult]:
    """``jobs`` conversions at once, each in a process of its own (none of this process's state inherited). A worker
    that dies (killed, out of memory) takes the pool down with it: the runs left unfinished are given to a new pool,
    up to ``PROCESS_ROUNDS`` times, as Ray reruns a lost task."""
    jobs = min(jobs, len(tasks))
    context = _forkserver()
    gpus = _gpus(tasks)
    sharing = gpus and jobs > gpus
    locks = [context.Lock() for _ in range(gpus)] if sharing else []
    if gpus:
        log.info("%d jobs on %d GPUs%s", jobs, gpus, " (jobs on one GPU take turns merging)" if sharing else "")
    results: dict[int, RunResult] = {}
    left = dict(enumerate(tasks))
    for round_ in range(1, PROCESS_ROUNDS + 1):
        lost = _pool_round(context, left, min(jobs, len(left)), gpus, locks, results, len(tasks))
        left = {i: task for i, (task, _) in lost.items()}
        if not lost or round_ == PROCESS_ROUNDS:
            break
        log.warning("a job's process ended; converting its %d unfinished runs again in new processes", len(left))
    for i, (task, error) in lost.items():
        if task.debug:
            raise error
        results[i] = _lost(task, f"its process ended ({type(error).__name__}: {error}); convert it again")
    return [results[i] for i in range(len(tasks))]


def _pool_round(
    context: Any,
    tasks: dict[int, RunTask],
    jobs: int,
    gpus: int,
    locks: Sequence[Any],
    results: dict[int, RunResult],
    total: int,
) -> dict[int, tuple[RunTask, BaseException]]:
    """One pool over ``tasks`` (index -> task): the results into ``results``; returns the tasks whose process ended
    before they did, with the error it left."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    slots = context.Queue()
    for k in range(jobs):
        slots.put(k)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    level = logging.getLogger("converter").getEffectiveLevel()
    initargs = (slots, locks, gpus, threads, level)
    lost: dict[int, tuple[RunTask, BaseException]] = {}
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=initargs) as pool:
        futures = {pool.submit(convert_task, task): i for i, task in tasks.items()}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except BrokenProcessPool as exc:  # a worker died: every run not finished is run again
                lost[i] = (tasks[i], exc)
                continue
            _announce(len(results), total, results[i])
    return lost


def require_ray() -> Any:
    """The ``ray`` module; ConvertError saying how to install it where it is not."""
    try:
        import ray
    except ImportError as exc:
        raise ConvertError(
            "--executor ray: Ray is not installed here; install it with pip install 'ckpt2hf[ray]'"
        ) from exc
    return ray


def _memory(task: RunTask) -> int:
    """The memory a conversion plans for (bytes): from the plan of its run, read from metadata."""
    from .pipeline import plan_run
    from .planner import peak_memory

    try:
        plan, _ = plan_run(task.options)
    except ConvertError:
        return 0  # the task reports the error itself
    with plan.sources:
        return peak_memory(plan, task.options)


def on_ray(tasks: Sequence[RunTask], address: str | None) -> list[RunResult]:
    """Each run a Ray task (one CPU; a GPU when it merges on one and the cluster has GPUs; the memory its plan
    needs), retried when its worker or node is lost. ``address``: the cluster's (default: ``RAY_ADDRESS``, else a
    Ray started here for the migration). The runs and the out-root must be at the same paths on every node."""
    ray = require_ray()
    if not tasks:
        return []
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    try:
        resources = ray.cluster_resources()
        per_node = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        gpus = resources.get("GPU", 0) and any(t.options.device != "cpu" for t in tasks)
        remote = ray.remote(convert_task)
        refs = []
        for task in tasks:
            memory = min(_memory(task), int(per_node * 0.9)) if per_node else 0
            options: dict[str, Any] = {
                "num_cpus": 1,
                "num_gpus": 1 if gpus and task.options.device != "cpu" else 0,
                "max_retries": RAY_RETRIES,
                "retry_exceptions": False,
            }
            if memory:
                options["memory"] = memory
            refs.append(remote.options(**options).remote(task))
        log.info("%d runs on Ray (%s)", len(refs), ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())[:3]))
        results: list[RunResult] = []
        for i, (task, ref) in enumerate(zip(tasks, refs, strict=True), 1):
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # lost more often than it was retried
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                message = f"lost on Ray after {RAY_RETRIES} retries ({type(exc).__name__}: {line[:200]})"
                result = _lost(task, message)
            results.append(result)
            _announce(i, len(tasks), result)
        return results
    finally:
        if started_here:
            ray.shutdown()


def check_spread(jobs: int, executor: str) -> None:
    """ConvertError for a number of jobs or an executor that cannot work (before anything is recorded)."""
    if executor not in EXECUTORS:
        raise ConvertError(f"--executor {executor}: use {' or '.join(EXECUTORS)}")
    if jobs < 1:
        raise ConvertError(f"--jobs {jobs}: give 1 or more")
    if executor == "ray":
        require_ray()


def migrate(
    tasks: Sequence[RunTask], jobs: int = 1, executor: str = "local", ray_address: str | None = None
) -> list[RunResult]:
    """Run ``tasks``: one after another in this process (``jobs`` 1), in ``jobs`` processes, or as Ray tasks; the
    results in the order of ``tasks``."""
    check_spread(jobs, executor)
    if executor == "local" and (jobs == 1 or len(tasks) < 2):
        return in_turn(tasks)
    if executor == "local":
        _forkserver()  # imports the pipeline beside the checks below
    # Up to date or not is found here, in milliseconds a run: only the runs to convert start processes or tasks.
    checked = [check_task(task) for task in tasks]
    todo = [c for c in checked if isinstance(c, RunTask)]
    log.info("%d of %d runs to convert", len(todo), len(tasks))
    if not todo:
        converted: list[RunResult] = []
    elif executor == "ray":
        converted = on_ray(todo, ray_address)
    else:
        converted = in_processes(todo, jobs) if len(todo) > 1 else in_turn(todo)
    given = iter(converted)
    return [c if isinstance(c, RunResult) else next(given) for c in checked]
