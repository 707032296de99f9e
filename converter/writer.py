"""Writing the export: a staging folder renamed into place, safetensors files, configs and support files, hashes."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from .errors import ConvertError
from .hashing import sha256_file

if TYPE_CHECKING:  # the CLI checks OUT with refuse_existing before torch is imported
    from .plan import PartPlan

log = logging.getLogger(__name__)


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` while a conversion writes it: a second convert with the same OUT, started
    meanwhile (two terminals, a batch script with a typo), stops with one line instead of replacing the first one's
    export. The lock is a hidden file beside OUT, removed when the conversion ends (filelock tolerates that)."""
    from filelock import FileLock, Timeout

    out = Path(out)
    path = out.parent / f".{out.name}.ckpt2hf-lock"
    key = str(path.resolve())
    if key in _HELD:  # this process holds it already (the command line takes it before the heavy imports)
        yield
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"{out.parent}: cannot create the output's parent folder ({exc.strerror})") from exc
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConvertError(
            f"{out}: another ckpt2hf convert is writing this export now; wait for it to finish or choose another --out"
        ) from None
    except OSError as exc:
        raise ConvertError(f"{out.parent}: cannot write here ({exc.strerror}); choose another --out") from exc
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        path.unlink(missing_ok=True)  # while still held: a waiting process then finds the inode unlinked
        lock.release()


_HELD: set[str] = set()  # the locks this process holds


def refuse_existing(out: Path, force: bool) -> None:
    """An existing OUT is replaced only with ``force``."""
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists; pass --force to replace it or choose another --out")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it to ``out``, on failure remove it.

    An existing ``out`` is refused unless ``force``; with ``force`` it stays intact until the new one is complete.
    """
    out = Path(out)
    refuse_existing(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"{parent}: cannot create the output's parent folder ({exc.strerror})") from exc
    _remove_stale_stages(parent, out.name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage = parent / f".{out.name}.ckpt2hf-tmp-{tag}"
    try:
        stage.mkdir()
    except OSError as exc:
        raise ConvertError(f"{parent}: cannot write here ({exc.strerror}); choose another --out") from exc
    try:
        try:
            yield stage
            _fsync_tree(stage)
        except (OSError, SafetensorError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:160]
            raise ConvertError(
                f"{out}: writing the export failed ({reason}); nothing was written; free space or choose another --out"
            ) from exc
        if out.exists():
            old = parent / f".{out.name}.ckpt2hf-old-{tag}"
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _remove_stale_stages(parent: Path, name: str) -> None:
    """Clean up after a convert that was killed (its process no longer exists): remove its staging folder, and
    put back a previous export it had moved aside but not yet replaced."""
    for stale in sorted(parent.glob(f".{name}.ckpt2hf-*-*-*")):
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        out = parent / name
        if ".ckpt2hf-old-" in stale.name and not out.exists():
            log.warning("restoring %s from %s, moved aside by an interrupted convert", out, stale)
            stale.rename(out)
        else:
            log.warning("removing %s, left by an interrupted convert (process %d)", stale, pid)
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def write_config(part: PartPlan, folder: Path, tied: bool) -> list[str]:
    """The part's config.json (``tie_word_embeddings`` false when a configured tie is not kept), the support files
    its base has (generation config, processor) and its tokenizer's files; returns the names of the files copied."""
    if part.config is None:
        return []
    config = copy.deepcopy(part.config)
    if part.tie is not None and part.tie.configured and not tied:
        config.get_text_config(decoder=True).tie_word_embeddings = False
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    for name in part.support_files:
        shutil.copyfile(part.base.path / name, folder / name)
    tokenizer = part.tokenizer.files if part.tokenizer is not None else ()
    for name in tokenizer:
        shutil.copyfile(part.tokenizer.path / name, folder / name)
    return [*part.support_files, *tokenizer]


def file_records(root: Path, known: dict[str, str] | None = None) -> list[dict[str, object]]:
    """``{"path", "bytes", "sha256"}`` for every file under ``root`` (paths relative to it, sorted).

    ``known`` maps relative paths to sha256 digests computed while the files were written (not re-read).
    """
    known = known or {}
    return [
        {"path": rel, "bytes": path.stat().st_size, "sha256": known.get(rel) or sha256_file(path)}
        for path in sorted(p for p in root.rglob("*") if p.is_file())
        for rel in [path.relative_to(root).as_posix()]
    ]
