"""Runs of multi-GPU training, made on CPU ranks: DeepSpeed ZeRO (driven the way Lightning's DeepSpeedStrategy
drives it, which refuses CPU) and FSDP2 with torch.distributed.checkpoint in Lightning's sharded layout.

Two gloo ranks (``worker``, spawned by tests/background.py) build every run, so the libraries are imported once.
Every file is written by the library that owns the format: DeepSpeed's ``save_checkpoint``, torch's ``dcp.save``,
Lightning's own checkpoint dict (``dump_checkpoint``) as DeepSpeed's client state and as ``meta.pt``, PEFT's
``save_pretrained`` for ``lora_weights/``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from pathlib import Path

import torch

WORLD = 2
STEPS = 2


@dataclasses.dataclass(frozen=True)
class DistSpec:
    name: str
    kind: str  # "deepspeed" or "fsdp"
    stage: int = 0
    bf16: bool = False
    exclude_frozen: bool = False
    adapter: bool = True  # write lora_weights/ with PEFT save_pretrained (rank 0)
    modules_to_save: tuple[str, ...] | None = ("embed_tokens", "lm_head")


# FSDP first: DeepSpeed's ZeRO-3 patches torch.nn.functional.linear for the rest of the process.
SPECS = (
    DistSpec("fsdp", "fsdp", adapter=False),
    DistSpec("zero1", "deepspeed", stage=1, modules_to_save=None),  # lm_head stays tied: a shared parameter
    DistSpec("zero2-bf16", "deepspeed", stage=2, bf16=True),
    DistSpec("zero3", "deepspeed", stage=3),
    DistSpec("zero3-no-frozen", "deepspeed", stage=3, exclude_frozen=True, adapter=False),
)


ONE_RANK = DistSpec("zero2-one-rank", "deepspeed", stage=2)
FSDP_MODEL_PARALLEL = "fsdp-modelparallel"  # also written by the "fsdp" run, in other layouts
FSDP_FULL = "fsdp-full"


def run_folders(root: Path, specs: tuple[DistSpec, ...] | None = None) -> dict[str, Path]:
    """name -> run folder (``ROOT/runs/NAME``) of what training ``specs`` (default: all) leaves."""
    specs = specs if specs is not None else (*SPECS, ONE_RANK)
    names = [spec.name for spec in specs]
    if any(spec.kind == "fsdp" for spec in specs):
        names += [FSDP_MODEL_PARALLEL, FSDP_FULL]
    return {name: Path(root) / "runs" / name for name in names}


def train(root: Path, bases: tuple[Path, Path], specs: tuple[DistSpec, ...]) -> dict[str, Path]:
    """Train ``specs`` on two spawned CPU ranks and wait for them (the benchmark's entry point)."""
    import torch.multiprocessing as mp

    args = (WORLD, str(root), [str(b) for b in bases], free_port(), specs)
    mp.start_processes(worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    return run_folders(root, specs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "DeepSpeed", "deepspeed", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def worker(rank: int, world: int, root: str, bases: list[str], port: int, specs: tuple[DistSpec, ...]) -> None:
    """One rank's part in training ``specs`` (see tests/background.py)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # two ranks and the test process share the machine's cores
    _quiet()
    import deepspeed
    import deepspeed.ops

    # No compiled DeepSpeed ops: its communication then goes through torch.distributed (gloo). Probing every op's
    # compiler and JIT-building the shared-memory all-reduce would take about 40 s on a fresh machine, for nothing
    # the checkpoint format depends on.
    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for spec in (s for s in specs if s != ONE_RANK):
        run = Path(root) / "runs" / spec.name
        if spec.kind == "deepspeed":
            _deepspeed_run(spec, rank, run, bases)
        else:
            _fsdp_run(spec, rank, run, bases)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if rank == 0 and ONE_RANK in specs:  # one more run, on one rank: its files have another world size
        import deepspeed.comm
        from deepspeed.utils import groups

        os.environ.update(MASTER_PORT=str(port + 1), WORLD_SIZE="1")
        deepspeed.comm.comm.cdb = None  # DeepSpeed keeps the finished process group; start it afresh
        groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = None
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        _deepspeed_run(ONE_RANK, 0, Path(root) / "runs" / ONE_RANK.name, bases)
        torch.distributed.destroy_process_group()


def _module(spec: DistSpec, bases: list[str]):
    from converter.example import _lightning_module_class

    torch.manual_seed(0)  # every rank builds the same model
    saved = list(spec.modules_to_save) if spec.modules_to_save else None
    return _lightning_module_class()(vision_name=bases[0], language_model_name=bases[1], modules_to_save=saved)


def _image_size(bases: list[str]) -> int:
    import json

    return json.loads((Path(bases[0]) / "config.json").read_text())["image_size"]


def _batches(rank: int, bases: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    size, vocab = _image_size(bases), _vocab(bases)
    return [
        (torch.randn(2, 3, size, size, generator=generator), torch.randint(0, vocab, (2, 6), generator=generator))
        for _ in range(STEPS)
    ]


def _vocab(bases: list[str]) -> int:
    import json

    return json.loads((Path(bases[1]) / "config.json").read_text())["vocab_size"]


def trained_logits_path(run: Path) -> Path:
    """Where a run's probe input and the logits the trained model gave on it are kept (beside the run)."""
    trained_by = {FSDP_MODEL_PARALLEL: "fsdp", FSDP_FULL: "fsdp"}.get(run.name, run.name)
    return run.parent.parent / "trained" / f"{trained_by}.pt"


@torch.no_grad()
def _save_trained_logits(spec: DistSpec, rank: int, module, run: Path, bases: list[str], dtype: torch.dtype) -> None:
    """The trained model's logits on a fixed probe, computed by every rank (sharded forwards are collective)."""
    generator = torch.Generator().manual_seed(7)
    size = _image_size(bases)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    ids = torch.randint(0, _vocab(bases), (2, 9), generator=generator)
    logits = module.vlm(pixels.to(dtype), ids).float()
    if rank == 0:
        path = trained_logits_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"pixel_values": pixels, "input_ids": ids, "logits": logits}, path)


def _lightning_checkpoint(module, global_step: int) -> dict:
    """Lightning's own checkpoint dict for ``module``, as its strategies hand it to DeepSpeed or write meta.pt."""
    import lightning

    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    checkpoint["global_step"] = global_step
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}


def _deepspeed_run(spec: DistSpec, rank: int, run: Path, bases: list[str]) -> None:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    module = _module(spec, bases)
    optimizer = module.configure_optimizers()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": spec.stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": spec.bf16},
    }
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: ZeRO-3 must gather it whole.
    set_z3_leaf_modules(module, [torch.nn.MultiheadAttention])
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=params, config=config)
    for step, (pixels, ids) in enumerate(_batches(rank, bases)):
        dtype = torch.bfloat16 if spec.bf16 else torch.float32
        loss = module.training_step((pixels.to(dtype), ids), step)
        engine.backward(loss)
        engine.step()
    _save_trained_logits(spec, rank, module, run, bases, torch.bfloat16 if spec.bf16 else torch.float32)
    client_state = _lightning_checkpoint(module, STEPS)
    engine.save_checkpoint(
        str(run / "checkpoints" / "last.ckpt"),
        client_state=client_state,
        tag="checkpoint",
        exclude_frozen_parameters=spec.exclude_frozen,
    )
    if spec.adapter:
        lm = module.language_model
        with deepspeed.zero.GatheredParameters(list(lm.parameters()), enabled=spec.stage == 3):
            if rank == 0:
                lm.save_pretrained(run / "lora_weights")


def _fsdp_run(spec: DistSpec, rank: int, run: Path, bases: list[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = _module(spec, bases)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in module.language_model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module.model.vision_encoder, mesh=mesh)
    fully_shard(module.model, mesh=mesh)  # the module training_step calls, so that its hooks gather the rest
    optimizer = module.configure_optimizers()
    for step, (pixels, ids) in enumerate(_batches(rank, bases)):
        loss = module.training_step((pixels, ids), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _save_trained_logits(spec, rank, module, run, bases, torch.float32)
    meta = _lightning_checkpoint(module, STEPS)
    weights, optim = get_model_state_dict(module), get_optimizer_state_dict(module, optimizer)
    # Lightning's FSDPStrategy (sharded): weights under "model"; ModelParallelStrategy: under "state_dict".
    for name, key in ((spec.name, "model"), (FSDP_MODEL_PARALLEL, "state_dict")):
        path = run.parent / name / "checkpoints" / "last.ckpt"
        dcp.save({key: weights, "optimizer_0": optim}, checkpoint_id=path)
        if rank == 0:
            torch.save(meta, path / "meta.pt")
    # The "full" state dict (FSDPStrategy state_dict_type="full", ModelParallel without distributed checkpoints):
    # consolidated on rank 0 into one ordinary Lightning checkpoint file.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(module, options=options)
    full_optim = get_optimizer_state_dict(module, optimizer, options=options)
    if rank == 0:
        path = run.parent / FSDP_FULL / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({**meta, "state_dict": full, "optimizer_states": [full_optim]}, path)
