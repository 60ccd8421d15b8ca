"""Small helpers every stage shares: user errors, atomic writes, reading JSON, paths stored in files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input from the user: the CLI prints it as one line (naming the file/field and what was expected)."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, on error remove it.

    Works for files and directories (e.g. an .mlpackage). Readers never see a half-written ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # the writer creates it (as a file or a directory)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            if tmp_path.is_dir():
                shutil.rmtree(tmp_path, ignore_errors=True)
            else:
                tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Paths stored in files: relocatable run and pipeline directories
# ---------------------------------------------------------------------------------------------------------------

PIPELINE_YAML = "pipeline.yaml"  # its presence makes a directory a pipeline directory (pipeline_dir)


def move_root(folder: str | os.PathLike[str]) -> Path:
    """What moves as one with the files written in ``folder``: the pipeline directory that is ``folder`` or
    holds it directly (OUT/dense, OUT/eval), else ``folder`` itself (a run directory, an export folder)."""
    folder = Path(os.path.normpath(Path(folder).absolute()))
    for d in (folder, folder.parent):
        if (d / PIPELINE_YAML).is_file():
            return d
    return folder


def store_path(
    target: str | os.PathLike[str], base: str | os.PathLike[str], root: str | os.PathLike[str]
) -> str:
    """How a file in ``base`` records ``target``: relative to ``base`` when it lies inside ``root`` (the directory
    that moves with the file, e.g. ``move_root(base)``), so a moved or copied directory keeps pointing at its own
    files; absolute otherwise (a user's dataset elsewhere). ``load_path`` reads it back."""
    if not str(target):
        return ""
    # lexical (no symlinks resolved): ".." in the stored path means the parent as the writer saw it
    t = Path(os.path.normpath(Path(target).absolute()))
    r = Path(os.path.normpath(Path(root).absolute()))
    if not t.is_relative_to(r):
        return str(t)
    return Path(os.path.relpath(t, os.path.normpath(Path(base).absolute()))).as_posix()


def load_path(text: str, base: str | os.PathLike[str]) -> Path:
    """A path recorded by ``store_path`` in a file in ``base``, absolute (old files recorded absolute paths)."""
    return Path(os.path.normpath(Path(base).absolute() / text))


def _map_keys(obj: dict[str, Any], keys: tuple[str, ...], convert: Any) -> dict[str, Any]:
    """A copy of ``obj`` with ``convert`` applied to the non-empty strings at ``keys`` ("a.b": obj["a"]["b"])."""
    out = json.loads(json.dumps(obj, default=str))
    for key in keys:
        *up, leaf = key.split(".")
        node = out
        for k in up:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            node[leaf] = convert(node[leaf])
    return out


def store_paths(obj: dict[str, Any], file: str | os.PathLike[str], keys: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` as ``file`` records it: the paths at ``keys`` through ``store_path`` (root: ``move_root``)."""
    base = Path(file).absolute().parent
    root = move_root(base)
    return _map_keys(obj, keys, lambda p: store_path(p, base, root))


def load_paths(obj: dict[str, Any], file: str | os.PathLike[str], keys: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` read from ``file``, its paths at ``keys`` absolute again (``load_path``)."""
    base = Path(file).absolute().parent
    return _map_keys(obj, keys, lambda p: str(load_path(p, base)))


def existing_path(
    path: str | os.PathLike[str], file: str | os.PathLike[str], field: str, hint: str = ""
) -> Path:
    """``path``, read from ``field`` of ``file``, which must still be there: else a UserError naming all three (a
    directory moved without the data it points at outside itself, say)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{file}: {field} {p} is not there (moved or deleted?){'; ' + hint if hint else ''}")
    return p
