"""Hyper-parameters as projects save them: OmegaConf configs (Hydra), Namespaces, dataclasses, partial optimizers.

They are read from the restricted unpickler's placeholders as plain data, OmegaConf interpolations resolved the way
OmegaConf resolves them, resolvers never evaluated; names are found at any depth."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from converter.errors import ConvertError
from converter.hparams import Opaque, Unresolved, find, lookup, recover, resolve
from converter.inspection import inspect_run, render
from converter.sources import unpickle

from helpers import assert_same_tensors, cli, export_tensors, refused, run_convert
from variants import VARIANTS, build_variant_bases

# A config with every kind of interpolation a Hydra project writes: absolute, relative to the enclosing node
# (".") and its parent (".."), inside strings, into lists, into other interpolations.
CONFIG = {
    "paths": {"root": "/data", "layers": 3},
    "model": {
        "dir": "${paths.root}/models",
        "net": {
            "vision_name": "${..dir}/vision",
            "again": "${.vision_name}",
            "depth": "${paths.layers}",
            "sizes": [1, "${paths.layers}", {"first": "${..0}"}],
        },
    },
    "rate": 1.5e-4,
    "flag": True,
    "nothing": None,
    "tags": ["a", "${model.net.depth}-layers"],
}


def _saved(tmp_path: Path, hyper_parameters: dict) -> dict:
    """``hyper_parameters`` through torch.save and ckpt2hf's restricted unpickler, recovered."""
    path = tmp_path / "hp.ckpt"
    torch.save({"hyper_parameters": hyper_parameters}, path)
    return recover(unpickle.load(path).obj["hyper_parameters"])


def test_omegaconf_configs_resolve_as_omegaconf_resolves_them(tmp_path):
    """Whole configs and nodes of them (``cfg.model`` passed alone pickles its parents: its interpolations still
    resolve against the root)."""
    cfg = OmegaConf.create(CONFIG)
    got = _saved(tmp_path, {"cfg": cfg, "model": cfg.model, "sizes": cfg.model.net.sizes, "lr": 0.1})
    assert got == {
        "cfg": OmegaConf.to_container(cfg, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "sizes": [1, 3, {"first": 1}],
        "lr": 0.1,
    }
    assert got["model"]["net"]["vision_name"] == "/data/models/vision"
    assert got["cfg"]["tags"] == ["a", "3-layers"]


def test_namespaces_dataclasses_partials_and_unknown_objects(tmp_path):
    import argparse

    args = argparse.Namespace(base="org/base", lora_r=8, nested={"k": [1, 2]})
    got = _saved(
        tmp_path,
        {
            "args": args,
            "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
            "dtype": torch.bfloat16,
            "kind": torch.nn.Linear,
        },
    )
    assert got["args"] == {"base": "org/base", "lora_r": 8, "nested": {"k": [1, 2]}}
    assert got["optimizer"] == Opaque("functools.partial(torch.optim.adamw.AdamW, ...)")
    assert got["dtype"] == torch.bfloat16 or isinstance(got["dtype"], Opaque)
    assert got["kind"] == Opaque("<class torch.nn.modules.linear.Linear>")


def test_what_cannot_be_resolved_says_why():
    tree = resolve(
        {
            "env": "${oc.env:HOME}",
            "through": "${env}",
            "inside": "dir/${env}/x",
            "gone": "${paths.nowhere}",
            "loop": "${loop}",
            "required": "???",
            "needs": "${required}",
            "ok": "${.gone}",
        }
    )
    assert tree["env"] == Unresolved("${oc.env:HOME}", "it calls the resolver oc.env, which ckpt2hf does not evaluate")
    assert tree["through"].via == ("${oc.env:HOME}",)
    assert tree["inside"].why == (
        "it calls the resolver oc.env, which ckpt2hf does not evaluate (through '${oc.env:HOME}')"
    )
    assert tree["gone"].reason == "paths does not exist"
    assert tree["loop"].reason == "it refers to itself"
    assert tree["required"] == "???"
    assert tree["needs"].reason == "required is ??? (a mandatory value that was never set)"
    assert tree["ok"].via == ("${paths.nowhere}",)
    assert (
        str(tree["env"]) == "<unresolved ${oc.env:HOME}: it calls the resolver oc.env, which ckpt2hf does not evaluate>"
    )


def test_names_are_found_by_dotted_path_or_at_any_depth():
    tree = resolve({"model": {"net": {"lm": "a", "lm2": "${.lm}"}, "eval": {"lm": "b"}}, "lm": "${model.net.lm}"})
    assert find(tree, "model.net.lm") == [("model.net.lm", "a")]
    assert find(tree, "lm") == [("model.net.lm", "a"), ("model.eval.lm", "b"), ("lm", "a")]
    assert find(tree, "model.nothing") == []
    # The same value at several paths (an interpolation repeats it) is one answer; distinct values are refused.
    assert lookup({"a": {"x": "v"}, "x": "v"}, ("x",), "it", "--it") == ("a.x", "v")
    with pytest.raises(ConvertError) as error:
        lookup(tree, ("lm",), "the base of language_model", "--base language_model=PATH", "run.ckpt")
    assert str(error.value) == (
        "run.ckpt: the base of language_model is ambiguous: hyper_parameters.model.net.lm = 'a', "
        "hyper_parameters.model.eval.lm = 'b', hyper_parameters.lm = 'a'; pass --base language_model=PATH"
    )
    assert lookup(tree, ("model.net.lm", "lm"), "it", "--it") == ("model.net.lm", "a")  # the first name found
    assert lookup({"x": None, "y": "???"}, ("x", "y"), "it", "--it") is None  # unset values are no answer
    with pytest.raises(ConvertError, match=r"^hyper_parameters.b = '\$\{oc.env:B\}' cannot be resolved: it calls "):
        lookup(resolve({"b": "${oc.env:B}"}), ("b",), "it", "--it")


# --- real runs (tests/variants.py): a Hydra config, a Namespace, a dataclass --------------------------------------
@pytest.mark.parametrize(
    ("name", "vision", "language_model"),
    [
        ("hydra", "cfg.model.net.vision_name", "cfg.model.net.language_model_name"),
        ("namespace", "args.vision_name", "args.language_model_name"),
        ("dataclass", "settings.vision_name", "settings.language_model_name"),
    ],
)
def test_bases_are_found_inside_saved_configs(name, vision, language_model, variant_runs):
    """(Each converts by default and matches the trained logits: test_peft_variants.)"""
    used = inspect_run(variant_runs[name])["hyper_parameters"]["used"]
    assert used["vision_encoder base"] == f"hyper_parameters.{vision}"
    assert used["language_model base"] == f"hyper_parameters.{language_model}"


def test_lora_scaling_is_found_inside_the_config_without_an_adapter_folder(variant_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(variant_runs["hydra"], run, ignore=shutil.ignore_patterns("lora_weights"))
    manifest = run_convert(run, tmp_path / "out")
    assert manifest["adapter"]["config_from"] == "hyper_parameters (cfg.model.lora.lora_r, cfg.model.lora.lora_alpha)"
    run_convert(variant_runs["hydra"], tmp_path / "with-adapter")
    assert_same_tensors(export_tensors(tmp_path / "out"), export_tensors(tmp_path / "with-adapter"))


def test_a_dataclass_is_read_never_constructed(variant_runs, tmp_path):
    run = variant_runs["dataclass"]
    marker = run.parent.parent / "constructed"  # PanoSettings.__setstate__ leaves it (Lightning built one in training)
    marker.unlink(missing_ok=True)
    report = inspect_run(run)
    run_convert(run, tmp_path / "out")
    assert not marker.exists()
    settings = report["hyper_parameters"]["values"]["settings"]
    assert sorted(settings) == ["language_model_name", "marker", "variant", "vision_name"]
    assert settings["variant"]["name"] == "dataclass"


def test_inspect_shows_the_recovered_config_and_what_it_gave(variant_runs):
    report = inspect_run(variant_runs["hydra"])
    values = report["hyper_parameters"]["values"]
    assert values["optimizer"] == "functools.partial(torch.optim.adamw.AdamW, ...)"
    assert values["cfg"]["tags"] == ["pano", "hydra"]
    assert values["cfg"]["trainer"]["default_root_dir"] == (
        "<unresolved ${paths.output_dir}: it calls the resolver oc.env, which ckpt2hf does not evaluate "
        "(through '${oc.env:HOME}/outputs')>"
    )
    json.dumps(report)  # --json prints it
    text = render(report)
    assert "        targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']" in text
    assert re.search(r"\n  language_model base +hyper_parameters\.cfg\.model\.net\.language_model_name\n", text)


def test_an_environment_variable_and_an_ambiguous_name_ask_for_the_base(variant_runs, tmp_path, capsys):
    """``paths.bases: ${oc.env:PANO_BASES}`` is never evaluated (the environment converting is not the one that
    trained); a second ``language_model_name`` under ``evaluation`` makes the name ambiguous."""
    run = variant_runs["hydra-env"]
    v = VARIANTS["hydra-env"]
    vision_dir, lm_dir = build_variant_bases(run.parents[1], v.lm, v.vision, v.tie, v.hidden)  # built: found
    line = refused(capsys, run, tmp_path)
    assert line == (
        f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'}: hyper_parameters.cfg.model.net.vision_name = "
        "'${..base_dir}/vision_encoder' cannot be resolved: it calls the resolver oc.env, which ckpt2hf does not "
        "evaluate (through '${paths.bases}' -> '${oc.env:PANO_BASES}'); pass --base vision_encoder=PATH"
    )
    vision = f"vision_encoder={vision_dir}"
    line = refused(capsys, run, tmp_path, "--base", vision)
    assert line == (
        f"ckpt2hf: error: {run / 'checkpoints' / 'last.ckpt'}: the base of language_model is ambiguous: "
        f"hyper_parameters.cfg.model.net.language_model_name = '{lm_dir}', "
        "hyper_parameters.cfg.evaluation.language_model_name = 'someorg/other-base'; pass --base language_model=PATH"
    )
    out = tmp_path / "out"
    code, _, stderr = cli(
        capsys, "convert", run, "--out", out, "--base", vision, "--base",
        f"language_model={lm_dir}", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    record = json.loads((out / "manifest.json").read_text())["components"]["language_model"]
    assert record["base_config_from"] == "--base language_model"
