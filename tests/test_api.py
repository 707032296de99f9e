"""The Python API as a release script uses it: only the names ``converter`` exports, no command line."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import pytest
import tomllib

import converter
from converter.timings import STAGES, WAITS

from helpers import REPO, cli


def test_a_release_script_plans_converts_verifies_and_inspects_with_the_api_alone(pano_run, tmp_path):
    out = tmp_path / "release"
    plan = converter.plan_conversion(pano_run, out, dtype="bfloat16")
    assert isinstance(plan, converter.ConversionPlan) and plan.out == out and not out.exists()
    assert [p["component"] for p in plan.parts] == ["vision_encoder", "resampler", "projector", "language_model"]

    result = converter.convert(pano_run, out, dtype="bfloat16")
    assert isinstance(result, converter.Conversion) and result.out == out
    assert result.components == {name: out / name for name in ("vision_encoder", "resampler", "projector")} | {
        "language_model": out / "language_model"
    }
    assert all(folder.is_dir() for folder in result.components.values())
    lm = result.verification["language_model"]
    assert lm["max_abs_logit_diff"] <= lm["tolerance"]  # against the unmerged PEFT model's logits
    assert set(result.manifest["components"]["language_model"]["dtypes"]) == {"bfloat16"}
    assert "timings" not in result.manifest and result.timings["verifying"] > 0
    assert result.as_json() == {**result.manifest, "timings": result.timings}

    checked = converter.verify(out)
    assert isinstance(checked, converter.Verification) and checked.ok and checked.problems == ()
    assert checked.files == len(result.files)

    report = converter.inspect(pano_run)
    assert isinstance(report, converter.Inspection) and report.layout == "panorama_vlm"
    assert report.render().splitlines()[0].startswith("checkpoint")

    (out / "projector" / "model.safetensors").write_bytes(b"changed")
    assert converter.verify(out).problems[0].startswith("changed: projector/model.safetensors")


def test_api_errors_are_the_command_lines_one_line(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(converter.ConvertError) as raised:
        converter.convert(missing)
    assert str(raised.value).startswith(f"{missing}: ")
    with pytest.raises(TypeError, match=r"unknown conversion option\(s\): dtypes; known: "):
        converter.convert(missing, dtypes="bfloat16")
    with pytest.raises(TypeError, match=r"use plan_conversion\(\)"):
        converter.convert(missing, dry_run=True)


def test_the_json_output_is_the_api_results_data(pano_run, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, _ = cli(capsys, "convert", pano_run, "--out", out, "--no-verify", "--quiet", "--json")
    assert code == 0
    manifest = json.loads(stdout)
    timings = manifest.pop("timings")
    assert manifest == {**json.loads((out / "manifest.json").read_text()), "out": str(out)}
    assert set(timings) == {*STAGES, *WAITS, "total"}
    # The stages that run on the converting thread, one after the other, fit in the wall time.
    assert 0 < timings["importing"] + timings["planning"] + timings["merging"] <= timings["total"]
    assert min(timings[s] for s in ("reading", "merging", "writing", "hashing")) > 0
    assert timings["verifying"] == 0  # --no-verify
    assert json.loads(cli(capsys, "verify", out, "--json")[1]) == converter.verify(out).as_json()
    assert json.loads(cli(capsys, "inspect", pano_run, "--json")[1]) == json.loads(
        json.dumps(converter.inspect(pano_run).as_json())
    )


def test_a_trace_shows_each_threads_stages_over_time(pano_run, tmp_path, capsys, monkeypatch):
    """``CKPT2HF_TRACE``: every timed block as a Trace Event "complete" event on its thread's track, in microseconds
    from the process's start; per stage the events add up to ``timings``' seconds."""
    from converter.names import TRACE

    trace = tmp_path / "trace.json"
    monkeypatch.setenv(TRACE, str(trace))
    code, stdout, _ = cli(
        capsys, "convert", pano_run, "--out", tmp_path / "out", "--engine", "streaming", "--quiet", "--json"
    )
    assert code == 0
    timings = json.loads(stdout)["timings"]
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"].split()[0] for e in events if e["ph"] == "M"}
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["name"] for e in spans} <= {*STAGES, *WAITS} and all(e["dur"] >= 0 <= e["ts"] for e in spans)
    assert {"MainThread", "ckpt2hf-read", "ckpt2hf-write", "ckpt2hf-disk", "ckpt2hf-hash"} <= set(tracks.values())
    # the shards hashed as they are written; the small files (config, tokenizer) by the converting thread
    assert {tracks[e["tid"]] for e in spans if e["name"] == "hashing"} == {"ckpt2hf-hash", "MainThread"}
    for stage in ("importing", "planning", "merging", "hashing", "verifying"):
        total = sum(e["dur"] for e in spans if e["name"] == stage) / 1e6
        assert total == pytest.approx(timings[stage], abs=1e-3 + 1e-6 * len(spans)), stage


def test_the_version_is_written_once(capsys):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "converter.version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", converter.__version__)
    with pytest.raises(SystemExit) as raised:
        cli(capsys, "--version")
    assert raised.value.code == 0 and capsys.readouterr().out == f"ckpt2hf {converter.__version__}\n"


def test_the_exports_are_the_api():
    exported = set(converter.__all__)
    public = {n for n in dir(converter) if not n.startswith("_") and not inspect.ismodule(getattr(converter, n))}
    assert public == exported - {"__version__"}
    assert {"convert", "inspect", "verify", "plan_conversion", "ConvertError", "__version__"} <= exported
    for name in exported - {"__version__"}:
        assert getattr(converter, name).__doc__, name


def test_the_layouts_are_package_data_with_one_copy():
    """configs/ at the top of the checkout is a link to the package's own folder, which the wheel carries."""
    assert (REPO / "configs").is_symlink() and (REPO / "configs").resolve() == REPO / "converter" / "configs"
    from converter.layout import CONFIG_DIR, builtin_names

    assert Path(str(CONFIG_DIR)) == REPO / "converter" / "configs"
    assert builtin_names() == sorted(p.stem for p in (REPO / "converter" / "configs").glob("*.yaml"))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"] == {"converter": ["configs/*.yaml"]}


def test_the_readme_documents_every_function_of_the_api():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API") : readme.index("## Converting a run")]
    functions = [n for n in converter.__all__ if n[0].islower() and not n.startswith("_")]
    assert [n for n in functions if f"converter.{n}(" not in section] == []


def test_the_debug_log_says_where_the_time_went(pano_run, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="converter.timings")
    code, _, _ = cli(capsys, "convert", pano_run, "--out", tmp_path / "export", "--no-verify", "--debug")
    assert code == 0
    line = next(r.getMessage() for r in caplog.records if "seconds per stage:" in r.getMessage())
    assert re.search(r"seconds per stage: importing [\d.]+, planning [\d.]+, reading [\d.]+, .* total [\d.]+$", line)


def test_the_command_line_reads_the_run_ahead_while_it_imports(pano_run, tmp_path, capsys, caplog):
    """Before the heavy imports the CLI asks the kernel to read the checkpoint and the adapter's weights (all of
    them: the budget is half the memory available) and stops asking once the conversion has planned."""
    from converter import prefetch

    ckpt = pano_run / "checkpoints" / "last.ckpt"
    files = prefetch.weight_files([ckpt, pano_run / "lora_weights"])
    assert files == [ckpt, pano_run / "lora_weights" / "adapter_model.safetensors"]
    total = sum(f.stat().st_size for f in files)
    caplog.set_level(logging.DEBUG, logger="converter.prefetch")
    code, _, _ = cli(capsys, "convert", pano_run, "--out", tmp_path / "export", "--no-verify", "--quiet")
    assert code == 0
    said = [r.getMessage() for r in caplog.records if r.name == "converter.prefetch"]
    assert len(said) == 1 and said[0].startswith(f"prefetch: asked the kernel to read {total / 1e9:.2f} GB of 2 files")
    assert not prefetch._started  # the command's end waited for it


def test_a_prefetch_asks_for_no_more_than_its_budget(pano_run):
    from converter import prefetch

    files = prefetch.weight_files([pano_run / "checkpoints", pano_run / "lora_weights"])
    total = sum(f.stat().st_size for f in files)
    for budget, asked in ((total + 1, total), (total // 3, total // 3), (0, 0)):
        run = prefetch.Prefetch(files, budget)
        run.wait()
        assert run.asked == asked
    stopped = prefetch.Prefetch(files, total)
    stopped.stop()  # at once: the thread ends after the request in hand
    assert not stopped._thread.is_alive()
