"""Runs that other processes train while the tests run: multi-GPU runs (two gloo ranks, tests/distributed.py), the
PEFT variants (tests/variants.py, trained by the last rank once its multi-GPU work is done, so that the libraries
are imported by as few processes as possible) and the consumer tests' export and GGUF (tests/consumers.py, made by
the first rank). Their tests run last (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import distributed
import variants


def _main(rank: int, world: int, roots: dict[str, str], bases: list[str], port: int) -> None:
    if "distributed" in roots:
        distributed.worker(rank, world, roots["distributed"], bases, port, (*distributed.SPECS, distributed.ONE_RANK))
    if "variants" in roots and rank == world - 1:
        variants.build_all(roots["variants"])
    if "consumers" in roots and rank == 0:  # the first rank is free once its multi-GPU share is done
        import consumers

        consumers.build(roots["consumers"], bases[0])


class Background:
    """Start training now; ``runs(kind)`` waits for them and returns name -> run folder."""

    def __init__(self, roots: dict[str, Path], bases: tuple[Path, Path]) -> None:
        import torch.multiprocessing as mp

        self.roots = {kind: Path(root) for kind, root in roots.items()}
        world = distributed.WORLD if "distributed" in roots else 1
        args = (world, {k: str(v) for k, v in roots.items()}, [str(b) for b in bases], distributed.free_port())
        self._context = mp.start_processes(_main, args=args, nprocs=world, join=False, start_method="spawn")
        self._done = False

    def runs(self, kind: str) -> dict[str, Path]:
        if not self._done:
            while not self._context.join():
                pass
            self._done = True
        if kind == "distributed":
            return distributed.run_folders(self.roots[kind])
        if kind == "consumers":
            import consumers

            return dict(zip(("export", "gguf_read"), consumers.outputs(self.roots[kind]), strict=True))
        return {name: self.roots[kind] / "runs" / name for name in variants.VARIANTS}
