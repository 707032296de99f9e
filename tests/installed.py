"""The package as a user installs it: ``make test`` runs this before pytest.

Builds the sdist and, from it, the wheel (``python -m build``); checks that both hold every subpackage of the
checkout and the built-in layouts; installs the wheel into a fresh virtual environment in a temporary folder outside
the checkout (its dependencies are the project venv's, reached through a ``.pth`` line, so nothing is downloaded);
and from that folder builds the example run, converts it and verifies the export with the installed ``ckpt2hf``
only. Exits non-zero with the step that failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fail(what: str) -> None:
    print(f"installed package: {what}", file=sys.stderr)
    sys.exit(1)


def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return done.stdout


def expected_files() -> set[str]:
    """Every module, subpackage and built-in layout of the checkout's package, as paths inside the wheel."""
    package = ROOT / "converter"
    found = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")}
    found |= {p.relative_to(ROOT).as_posix() for p in (package / "configs").glob("*.yaml")}
    return {f for f in found if "__pycache__" not in f}


def check_archives(dist: Path) -> Path:
    wheel = next(dist.glob("ckpt2hf-*.whl"))
    sdist = next(dist.glob("ckpt2hf-*.tar.gz"))
    expected = expected_files()
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        in_sdist = {n.removeprefix(f"{top}/") for n in tar.getnames()}
    for name, held in (("wheel", in_wheel), ("sdist", in_sdist)):
        missing = sorted(expected - held)
        if missing:
            fail(f"the {name} lacks {len(missing)} files of the package: {', '.join(missing[:5])}")
    print(f"installed package: {wheel.name} and {sdist.name} hold all {len(expected)} files of the package")
    return wheel


def main() -> int:
    python = Path(sys.executable)
    dist = ROOT / "build" / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run([python, "-m", "build", "--outdir", dist, ROOT], cwd=ROOT)  # the sdist, then the wheel built from it
    wheel = check_archives(dist)

    with tempfile.TemporaryDirectory(prefix="ckpt2hf-installed-") as tmp:
        here = Path(tmp)
        if here.resolve().is_relative_to(ROOT):
            fail(f"{here} is inside the checkout")
        env_dir = here / "env"
        run([python, "-m", "venv", "--without-pip", env_dir], cwd=here)
        env_python = env_dir / "bin" / "python"
        run([python, "-m", "pip", "--python", env_python, "install", "-q", "--no-deps", wheel], cwd=here)
        # The dependencies are the project venv's (appended after the fresh site-packages, so the installed
        # ckpt2hf is found first; the venv's editable-install hook is a .pth file there, which is not processed).
        purelib = Path(run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], here))
        (Path(purelib.as_posix().strip()) / "_project_dependencies.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n"
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        found = run([env_python, "-c", "import converter; print(converter.__file__)"], here, env).strip()
        if not Path(found).resolve().is_relative_to(env_dir.resolve()):
            fail(f"import converter found {found}, not the installed copy under {env_dir}")
        ckpt2hf = env_dir / "bin" / "ckpt2hf"
        version = run([ckpt2hf, "--version"], here, env).strip()
        run_dir = Path(run([env_python, "-m", "converter.example", here / "example"], here, env).strip())
        run([ckpt2hf, "convert", run_dir, "--out", here / "export", "--quiet"], here, env)
        checked = json.loads(run([ckpt2hf, "verify", here / "export", "--json"], here, env))
        if checked["problems"] or not checked["files"]:
            fail(f"verify found {checked}")
        manifest = json.loads((here / "export" / "manifest.json").read_text())
        print(
            f"installed package: {version} from {wheel.name}, installed in {env_dir}, converted the example run "
            f"({manifest['config']} layout, {manifest['engine']} engine, verified) and verify found its "
            f"{checked['files']} files as the manifest says"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
