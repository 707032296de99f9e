"""Session fixtures: real training runs (tiny models from config, a real lightning.Trainer, real PEFT saves)."""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test process, the background processes and the command-line runs share two cores: OpenMP threads that spin
# between torch's parallel regions would take them from each other (the CLI sets the same for itself).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from converter.example import RunSpec, TinyShape, build_bases, build_run  # noqa: E402

from helpers import run_convert  # noqa: E402
from trainers import causal_lm_module  # noqa: E402

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny SigLIP vision tower and tiny Qwen3 LM (tie_word_embeddings true), as local HF folders."""
    return build_bases(tmp_path_factory.mktemp("bases"))


def _run(tmp_path_factory, bases, make_module=None, **spec) -> Path:
    root = tmp_path_factory.mktemp(spec.get("name", "run"))
    return build_run(root, RunSpec(**spec), bases=bases, make_module=make_module)


@pytest.fixture(scope="session")
def pano_run(tmp_path_factory, bases) -> Path:
    """The seed layout: LoRA r=32 alpha=64 on the 7 projections, modules_to_save embed_tokens + lm_head."""
    return _run(tmp_path_factory, bases, name="pano")


@pytest.fixture(scope="session")
def stale_adapter_run(tmp_path_factory, bases) -> Path:
    """lora_weights/ saved at step 1, the checkpoint at step 3."""
    return _run(tmp_path_factory, bases, name="stale", adapter_step=1)


@pytest.fixture(scope="session")
def named_adapter_run(tmp_path_factory, bases) -> Path:
    """Adapter named "pano" (saved in lora_weights/pano/), model under the attribute "net"."""
    return _run(tmp_path_factory, bases, name="named", adapter_name="pano", attribute="net")


@pytest.fixture(scope="session")
def dora_run(tmp_path_factory, bases) -> Path:
    """DoRA with rsLoRA scaling and a rank pattern: variants whose merge PEFT defines."""
    extra = {"use_dora": True, "use_rslora": True, "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"q_proj": 8}}
    return _run(tmp_path_factory, bases, name="dora", lora_r=8, lora_alpha=16, lora_extra=extra)


@pytest.fixture(scope="session")
def causal_lm_run(tmp_path_factory, bases) -> Path:
    """A plain Lightning + PEFT causal LM without modules_to_save: lm_head stays tied."""
    return _run(tmp_path_factory, bases, lambda vision, lm: causal_lm_module(lm), name="causal")


@pytest.fixture(scope="session")
def deep_run(tmp_path_factory) -> Path:
    """The 28-layer layout of the seed's Qwen3 LM (narrow, so it trains in seconds)."""
    root = tmp_path_factory.mktemp("deep")
    shape = TinyShape(layers=28, hidden=16, intermediate=32, heads=2, kv_heads=1, head_dim=8, vocab=64)
    return build_run(root, RunSpec(name="deep", steps=1), bases=build_bases(root, shape))


@pytest.fixture(scope="session")
def pano_export(pano_run, tmp_path_factory):
    """The seed run converted by the full engine with verification on: (folder, manifest)."""
    out = tmp_path_factory.mktemp("exports") / "pano"
    return out, run_convert(pano_run, out, engine="full", verify=True)


# Made by other processes while the tests run; the tests that need them go last, in this order.
BACKGROUND = (
    "example_process", "old_peft_run", "old_tutorial_run", "distributed_runs", "variant_runs", "layout_runs",
    "consumer_export", "tuner_runs",
)  # fmt: skip


def _needs(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """Tests of runs trained in the background go last, so that the other tests run meanwhile."""
    items.sort(key=lambda item: tuple(_needs(item, f) for f in reversed(BACKGROUND)))


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory, bases):
    """At the first test, start training the runs in the background that any selected test needs."""
    wanted = [f for f in BACKGROUND if any(_needs(item, f) for item in request.session.items)]
    if not wanted:
        return None
    from background import Background

    kinds = {
        "example_process": "example",
        "distributed_runs": "distributed",
        "variant_runs": "variants",
        "consumer_export": "consumers",
        "tuner_runs": "tuners",
        "layout_runs": "layouts",
        "old_peft_run": "old_stack",
        "old_tutorial_run": "old_tutorial",
    }
    return Background({kinds[f]: tmp_path_factory.mktemp(kinds[f]) for f in wanted}, bases)


@pytest.fixture(scope="session")
def distributed_runs(_background) -> dict[str, Path]:
    """Runs of multi-GPU training, made by two CPU ranks: DeepSpeed ZeRO-1/2/3 and FSDP2 (tests/distributed.py)."""
    return _background.runs("distributed")


@pytest.fixture(scope="session")
def variant_runs(_background) -> dict[str, Path]:
    """PEFT runs made the ways real VLM projects make them (tests/variants.py)."""
    return _background.runs("variants")


@pytest.fixture(scope="session")
def layout_runs(_background) -> dict[str, Path]:
    """Runs left the ways projects leave them: the tutorial LM module, checkpoints without frozen weights, a compiled
    inner module (tests/layouts.py)."""
    return _background.runs("layouts")


@pytest.fixture(scope="session")
def old_peft_run(_background) -> Path:
    """A run made by PEFT 0.6.2 and transformers 4.36.2 (tests/old_stack.py; make test installs them)."""
    return _background.old_stack()


@pytest.fixture(scope="session")
def old_tutorial_run(_background) -> Path:
    """The tutorial LM module trained by pytorch_lightning 1.9 with PEFT 0.10 (tests/old_stack.py)."""
    return _background.old_stack(tutorial=True)


@pytest.fixture(scope="session")
def tuner_runs(_background) -> dict[str, Path]:
    """Runs of PEFT's other tuners, the PEFT config object in the hyper-parameters (tests/tuners.py)."""
    return _background.runs("tuners")


@pytest.fixture(scope="session")
def consumer_export(_background) -> dict[str, Path]:
    """A Qwen-vocabulary LoRA run's export and llama.cpp's GGUF of it (tests/consumers.py): {"export", "gguf"}."""
    return _background.runs("consumers")


@pytest.fixture(scope="session")
def example_process(_background) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m converter.example ROOT`` run in a fresh process, as ``make convert`` runs it: (ROOT, result)."""
    return _background.example()
