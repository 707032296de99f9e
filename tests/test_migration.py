"""Migrations of many runs: resumable, from a list, in processes, in shards of an array job and on a real local Ray
cluster, all producing the exports one sequential process produces; ``status`` shows the whole migration."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from converter.cli import main

from helpers import REPO, cli, no_stage_left, tree_digest

NAMES = ("m0", "m1", "m2", "m3")
RAY = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="module")
def runs(causal_lm_run, tmp_path_factory) -> list[Path]:
    """Four runs of a migration (copies of one real run under other names: each its own export)."""
    root = tmp_path_factory.mktemp("migration-runs")
    for name in NAMES:
        shutil.copytree(causal_lm_run, root / name)
    return [root / name for name in NAMES]


def command(*argv: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "converter", *map(str, argv)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def exports(root: Path) -> dict[str, dict[str, str]]:
    """Each export's files and their sha256 (the manifest aside: it records when and where it was written)."""
    found = {}
    for out in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        found[out.name] = {k: v for k, v in tree_digest(out).items() if k != "manifest.json"}
    return found


def kill_when_converting(record: Path, proc: subprocess.Popen) -> int:
    """SIGKILL the process that ``record`` (a run's ledger record) says is converting its run, as soon as it says
    so; its pid."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            found = json.loads(record.read_text())
        except (OSError, ValueError):  # not there yet, or the pending record being created
            found = {}
        if found.get("status") == "converting":
            os.kill(found["pid"], signal.SIGKILL)
            return found["pid"]
        time.sleep(0.005)
    raise AssertionError(f"{record.stem} was never seen converting")


def statuses(capsys, root: Path) -> tuple[int, dict[str, str]]:
    code, stdout, _ = cli(capsys, "status", root, "--json")
    return code, {Path(r["out"]).name: r["status"] for r in json.loads(stdout)["runs"]}


@pytest.fixture(scope="module")
def sequential(runs, tmp_path_factory) -> Path:
    """The reference: the four runs converted one after another by one process."""
    root = tmp_path_factory.mktemp("sequential") / "out"
    assert main(["convert", *map(str, runs), "--out-root", str(root), "--no-verify", "--quiet"]) == 0
    return root


def test_a_migration_killed_halfway_converts_only_what_was_left(runs, tmp_path, capsys):
    root = tmp_path / "out"
    ledger = root / ".ckpt2hf" / "runs"
    proc = command("convert", *runs[:3], "--out-root", root, "--quiet")  # verified: each run takes a while
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            status = json.loads((ledger / "m1.json").read_text())["status"]
        except (OSError, ValueError):  # not there yet, or the pending record being created
            status = None
        if status == "converting":
            proc.send_signal(signal.SIGKILL)  # while m1 converts
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.wait()
    assert json.loads((ledger / "m1.json").read_text())["status"] == "converting"
    assert not (root / "m1").exists() and not (root / "m2").exists()  # nothing half-written at an export
    assert cli(capsys, "verify", root / "m0")[0] == 0
    code, stdout, _ = cli(capsys, "status", root)
    assert code == 1
    assert stdout.splitlines()[-1] == "1 of 3 runs done (1 converted, 1 interrupted, 1 pending)"
    assert statuses(capsys, root)[1] == {"m0": "converted", "m1": "interrupted", "m2": "pending"}
    m0 = tree_digest(root / "m0")

    code, stdout, stderr = cli(capsys, "convert", *runs[:3], "--out-root", root, "--quiet", "--json")
    assert code == 0, stderr
    done = {Path(r["out"]).name: (r["status"], r["message"]) for r in json.loads(stdout)["runs"]}
    assert done == {
        "m0": ("up to date", ""),
        "m1": ("converted", "no export yet"),
        "m2": ("converted", "no export yet"),
    }
    assert tree_digest(root / "m0") == m0 and no_stage_left(root)
    assert all(cli(capsys, "verify", root / name)[0] == 0 for name in ("m1", "m2"))
    assert statuses(capsys, root) == (0, {"m0": "up to date", "m1": "converted", "m2": "converted"})


def test_a_changed_run_or_changed_options_convert_again(runs, tmp_path, capsys):
    run = tmp_path / "changing"
    shutil.copytree(runs[0], run)
    root = tmp_path / "out"

    def migrate(*extra: str) -> tuple[str, str]:
        code, stdout, stderr = cli(
            capsys, "convert", run, "--out-root", root, "--no-verify", "--quiet", "--json", *extra
        )
        assert code == 0, stderr
        (record,) = json.loads(stdout)["runs"]
        return record["status"], record["message"]

    assert migrate() == ("converted", "no export yet")
    assert migrate() == ("up to date", "")
    assert migrate("--dtype", "bfloat16") == ("converted", "options changed")
    assert migrate("--dtype", "bfloat16") == ("up to date", "")
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["global_step"] += 1  # the checkpoint's content changes (its data.pkl record), not its tensors
    torch.save(state, ckpt)
    assert migrate("--dtype", "bfloat16") == ("converted", "the checkpoint changed")
    adapter = run / "lora_weights" / "README.md"
    adapter.write_text(adapter.read_text() + "\nedited\n")
    assert migrate("--dtype", "bfloat16") == ("converted", "the adapter folder changed")
    assert migrate("--dtype", "bfloat16", "--force") == ("converted", "forced")


def test_a_folder_that_is_no_export_fails_its_run_alone(runs, tmp_path, capsys):
    root = tmp_path / "out"
    (root / "m0").mkdir(parents=True)
    (root / "m0" / "notes.txt").write_text("mine")
    code, stdout, stderr = cli(capsys, "convert", *runs[:2], "--out-root", root, "--no-verify", "--quiet")
    assert code == 2 and stderr.splitlines()[-1] == "ckpt2hf: error: 1 of 2 runs failed"
    rows = stdout.splitlines()
    assert rows[1].split()[:2] == [str(runs[0]), "failed"]
    assert rows[2].strip() == (
        f"{root / 'm0'}: there, but not a ckpt2hf export (no readable manifest.json); move it away or pass --force"
    )
    assert rows[3].split()[:2] == [str(runs[1]), "converted"]
    assert (root / "m0" / "notes.txt").read_text() == "mine"


def test_shards_of_an_array_job_and_jobs_write_the_sequential_exports(runs, sequential, tmp_path, capsys):
    sharded, jobs = tmp_path / "sharded", tmp_path / "jobs"
    listing = tmp_path / "runs.txt"
    listing.write_text("# the migration\n" + "\n".join(f"{r}  # {r.name}" for r in reversed(runs)) + "\n\n")
    argv = ("convert", "--runs-from", listing, "--no-verify", "--quiet")
    started = [
        command(*argv, "--out-root", sharded, "--shard", "0/2"),
        # the second task of an array job numbered from 1 (sbatch --array=1-2)
        command(
            *argv,
            "--out-root",
            sharded,
            env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
        ),
        command(*argv, "--out-root", jobs, "--jobs", "2"),
    ]
    results = [finished(p) for p in started]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    shard_rows = [[line.split()[0] for line in out.splitlines()[1:-1]] for _, out, _ in results[:2]]
    assert shard_rows == [[str(runs[0]), str(runs[2])], [str(runs[1]), str(runs[3])]]  # every second by name
    assert exports(sharded) == exports(jobs) == exports(sequential)
    code, stdout, _ = cli(capsys, "status", sharded, "--json")
    records = {Path(r["out"]).name: (r["status"], r["shard"]) for r in json.loads(stdout)["runs"]}
    assert code == 0 and records == {
        "m0": ("converted", "0/2"),
        "m1": ("converted", "1/2"),
        "m2": ("converted", "0/2"),
        "m3": ("converted", "1/2"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def ray_started(tmp_path_factory):
    """A real local Ray cluster: a head with 2 CPUs, started at the module's first test (it comes up while the
    others run) and stopped at its end; None where Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        yield None
        return
    port = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield head, f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGKILL)  # the head, its GCS, raylet and workers: one process group (SIGTERM: 30 s)
    head.wait(timeout=60)


@pytest.fixture
def ray_head(ray_started) -> str:
    """The address of the module's Ray cluster, once it answers."""
    if ray_started is None:
        pytest.skip("ray is not installed (make venv installs it)")
    head, address = ray_started
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(1)
    return address


def test_ray_tasks_write_the_sequential_exports_into_the_same_table(runs, sequential, ray_head, tmp_path, capsys):
    root = tmp_path / "ray"
    code, stdout, stderr = finished(
        command(
            "convert", *runs, "--out-root", root, "--executor", "ray", "--ray-address", ray_head, "--no-verify",
            "--quiet",
        )
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == "4 of 4 runs done (4 converted)"
    assert exports(root) == exports(sequential)
    assert statuses(capsys, root) == (0, dict.fromkeys(NAMES, "converted"))


def test_migration_flags_that_cannot_work_are_one_line(runs, tmp_path, capsys, monkeypatch):
    root = tmp_path / "out"
    for argv, said in [
        (["--out-root", root, "--shard", "2/2"], "--shard 2/2: expected I/N with 0 <= I < N, e.g. 0/4 for the first "),
        (["--jobs", "2"], "--jobs spreads a migration: give the runs with --out-root DIR"),
        (["--out-root", root, "--jobs", "0"], "--jobs 0: give 1 or more"),
        (["--runs-from", tmp_path / "none.txt"], "several runs: give --out-root DIR (each run into DIR/<run name>)"),
    ]:
        code, stdout, stderr = cli(capsys, "convert", runs[0], *argv, "--quiet")
        assert (code, stdout) == (2, "") and stderr.startswith(f"ckpt2hf: error: {said}"), stderr
        assert len(stderr.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray absent, as where the extra is not installed
    code, _, stderr = cli(capsys, "convert", runs[0], "--out-root", root, "--executor", "ray", "--quiet")
    assert (code, stderr) == (
        2,
        "ckpt2hf: error: --executor ray: Ray is not installed here; install it with pip install 'ckpt2hf[ray]'\n",
    )
    code, _, stderr = cli(capsys, "status", tmp_path, "--quiet")
    assert (code, stderr) == (
        2,
        f"ckpt2hf: error: {tmp_path}: no migration here (no .ckpt2hf/runs/); convert runs with --out-root {tmp_path}\n",
    )
    assert not root.exists()


def test_the_api_migrates_and_reports_as_the_command_does(runs, sequential, tmp_path):
    import converter

    root = tmp_path / "api"
    found = converter.migrate(runs[:2], root, verify=False)
    assert isinstance(found, converter.Migration) and found.ok
    assert [(r.out.name, r.status) for r in found.runs] == [("m0", "converted"), ("m1", "converted")]
    again = converter.migrate(runs[:2], root, verify=False)
    assert again.counts == {"up to date": 2}
    assert converter.status(root).as_json()["counts"] == {"up to date": 2}
    assert exports(root) == {k: v for k, v in exports(sequential).items() if k in ("m0", "m1")}


def test_a_ray_task_whose_worker_is_lost_is_run_again(runs, sequential, ray_head, tmp_path, capsys):
    """The worker converting m0 is killed (as when its node is lost): Ray runs the task again, the run converts."""
    root = tmp_path / "ray-lost"
    record = root / ".ckpt2hf" / "runs" / "m0.json"
    argv = ("convert", *runs[:2], "--out-root", root, "--executor", "ray", "--ray-address", ray_head, "--no-verify")
    proc = command(*argv, "--quiet")
    killed = kill_when_converting(record, proc)
    code, stdout, stderr = finished(proc)
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == "2 of 2 runs done (2 converted)"
    final = json.loads(record.read_text())
    assert final["status"] == "converted" and final["pid"] != killed  # by the task's second worker
    assert exports(root) == {k: v for k, v in exports(sequential).items() if k in ("m0", "m1")}
    assert no_stage_left(root)


def test_a_job_whose_process_is_killed_is_converted_again(runs, sequential, tmp_path):
    """--jobs 2: the process converting m0 is killed (as the kernel does when memory runs out); the pool it broke is
    replaced and the unfinished runs convert."""
    root = tmp_path / "jobs-lost"
    record = root / ".ckpt2hf" / "runs" / "m0.json"
    proc = command("convert", *runs[:3], "--out-root", root, "--jobs", "2", "--no-verify")
    killed = kill_when_converting(record, proc)
    code, stdout, stderr = finished(proc)
    assert code == 0, stderr
    assert "a job's process ended; converting its " in stderr
    assert stdout.splitlines()[-1] == "3 of 3 runs done (3 converted)"
    assert json.loads(record.read_text())["pid"] != killed
    assert exports(root) == {k: v for k, v in exports(sequential).items() if k in ("m0", "m1", "m2")}
    assert no_stage_left(root)


def test_a_migrations_paths_reach_workers_as_absolute_paths(tmp_path, monkeypatch):
    """A Ray task runs in a folder of its own: the paths a migration is given are made absolute before it starts."""
    from converter.migration import absolute_paths
    from converter.options import ConvertOptions

    monkeypatch.chdir(tmp_path)
    (tmp_path / "picked.ckpt").write_bytes(b"")
    given = ConvertOptions(run=Path("."), bases={"language_model": Path("bases/lm")}, tokenizer=Path("tok"))
    made = absolute_paths(given)
    assert made.bases == {"language_model": tmp_path / "bases" / "lm"} and made.tokenizer == tmp_path / "tok"
    assert absolute_paths(ConvertOptions(run=Path("."), ckpt=Path("picked.ckpt"))).ckpt == tmp_path / "picked.ckpt"
    in_each_run = Path("checkpoints/epoch=1.ckpt")  # not here: relative to each run, as find_inputs reads it
    assert absolute_paths(ConvertOptions(run=Path("."), ckpt=in_each_run)).ckpt == in_each_run
