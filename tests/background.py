"""Runs that other processes train while the tests run: multi-GPU runs (two gloo ranks, tests/distributed.py), the
PEFT variants (tests/variants.py, trained by the last rank once its multi-GPU work is done, so that the libraries
are imported by as few processes as possible), the consumer tests' export and GGUF (tests/consumers.py, made by
the first rank), the runs of PEFT's other tuners (tests/tuners.py, the first rank after that) and the runs left
the ways projects leave them (tests/layouts.py, the last rank after the variants).
 Their tests run last (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import distributed
import layouts
import tuners
import variants
from helpers import REPO

DONE = ".done-{rank}"  # written into a kind's root by each rank that finished its share of it
OLD_STACK = REPO / "build" / "old-stack"  # make test installs it
OLD_PL = REPO / "build" / "old-stack-pl19"  # make test installs it


def _main(rank: int, world: int, roots: dict[str, str], bases: list[str], port: int) -> None:
    # Below the test process in priority: its tests are the critical path; this work fills the idle cores, and has
    # them all once the tests that wait for it are reached (they run last).
    os.nice(10)
    if "distributed" in roots:
        distributed.worker(rank, world, roots["distributed"], bases, port, (*distributed.SPECS, distributed.ONE_RANK))
        _done(roots["distributed"], rank)
    if "variants" in roots and rank == world - 1:
        variants.build_all(roots["variants"])
        _done(roots["variants"], 0)
    if "layouts" in roots and rank == world - 1:
        layouts.build_all(roots["layouts"])
        _done(roots["layouts"], 0)
    if "consumers" in roots and rank == 0:  # the first rank is free once its multi-GPU share is done
        import consumers

        consumers.build(roots["consumers"], bases[0])
        _done(roots["consumers"], 0)
    if "tuners" in roots and rank == 0:
        tuners.build_all(roots["tuners"])
        _done(roots["tuners"], 0)


def _old_stack(stack: Path, root: Path, *args: str) -> subprocess.Popen:
    """tests/old_stack.py with an older stack ahead of the venv's packages."""
    env = {**os.environ, "PYTHONPATH": str(stack), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "tests" / "old_stack.py"), str(root), *args]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.nice(10),
    )  # fmt: skip


def _done(root: str, rank: int) -> None:
    (Path(root) / DONE.format(rank=rank)).touch()


class Background:
    """Start training now; ``runs(kind)`` waits for that kind's work (not the others') and returns name -> run
    folder."""

    def __init__(self, roots: dict[str, Path], bases: tuple[Path, Path]) -> None:
        import torch.multiprocessing as mp

        self.roots = {kind: Path(root) for kind, root in roots.items()}
        self._example = self._old = None
        self._old_pl = None
        if "old_stack" in roots:  # an older PEFT and transformers ahead of the venv's, in a process of their own
            self._old = _old_stack(OLD_STACK, roots["old_stack"])
        if "old_tutorial" in roots:  # pytorch_lightning 1.9 and PEFT 0.10
            self._old_pl = _old_stack(OLD_PL, roots["old_tutorial"], "--tutorial")
        if "example" in roots:  # what make convert runs first, in a fresh process
            command = [sys.executable, "-m", "converter.example", str(roots["example"])]
            self._example = subprocess.Popen(
                command, cwd=REPO, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(10)
            )
        self.world = distributed.WORLD if "distributed" in roots else 1
        self._context = None
        if set(roots) - {"example", "old_stack", "old_tutorial"}:
            args = (self.world, {k: str(v) for k, v in roots.items()}, [str(b) for b in bases], distributed.free_port())
            self._context = mp.start_processes(_main, args=args, nprocs=self.world, join=False, start_method="spawn")
        self._finished = False

    def old_stack(self, tutorial: bool = False) -> Path:
        """The PEFT 0.6 run (or the pytorch_lightning 1.9 tutorial run) of tests/old_stack.py, once it is done."""
        process = self._old_pl if tutorial else self._old
        stdout, stderr = process.communicate(timeout=600)
        if process.returncode != 0:
            stack = OLD_PL if tutorial else OLD_STACK
            raise RuntimeError(f"tests/old_stack.py failed (make test installs {stack}):\n{stderr[-3000:]}")
        return Path(stdout.strip().splitlines()[-1])

    def example(self) -> tuple[Path, subprocess.CompletedProcess]:
        stdout, _ = self._example.communicate(timeout=300)
        return self.roots["example"], subprocess.CompletedProcess(self._example.args, self._example.returncode, stdout)

    def _wait(self, kind: str) -> None:
        ranks = range(self.world) if kind == "distributed" else [0]
        markers = [self.roots[kind] / DONE.format(rank=rank) for rank in ranks]
        while not all(m.is_file() for m in markers):
            if self._finished:  # every process ended (join raises for one that failed)
                raise RuntimeError(f"the background processes ended without finishing {kind}")
            self._finished = self._context.join(timeout=0.2)

    def runs(self, kind: str) -> dict[str, Path]:
        self._wait(kind)
        if kind == "distributed":
            return distributed.run_folders(self.roots[kind])
        if kind == "consumers":
            import consumers

            return dict(zip(("export", "gguf_read"), consumers.outputs(self.roots[kind]), strict=True))
        names = {"tuners": tuners.TUNERS, "layouts": layouts.RUNS}.get(kind, variants.VARIANTS)
        return {name: self.roots[kind] / "runs" / name for name in names}
