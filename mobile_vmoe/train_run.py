"""The run directory of ``mobile-vmoe train --out RUN`` (docs/FILES.md): its lock, config, held-out list and
checkpoints.

- ``RUN/.lock``: the training that writes RUN holds an exclusive ``fcntl.flock`` on it for the whole run; the
  kernel releases it when the process ends, killed or not. A second training into RUN is refused.
- ``RUN/config.yaml``: written once the config is known to be valid for RUN; a resume may change only
  ``config.RESUME_MAY_CHANGE`` (every other changed key is named, old -> new, and refused).
- ``RUN/checkpoints/step_XXXXXXXX/{model.safetensors, state.pt, COMPLETE}``: written in a temporary directory
  and renamed; COMPLETE last. A checkpoint counts only when its weights and its state both read; a damaged one
  is moved aside to ``step_XXXXXXXX.damaged`` on resume, and the next older one is used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import MODEL_FILE, ModelMeta, save_model
from .common import UserError, atomic_path, move_root, write_text_atomic
from .config import RESUME_MAY_CHANGE, Config, config_changes, config_from_dict, dump_yaml, load_config
from .data import Sample

log = logging.getLogger(__name__)

__all__ = [
    "restore_checkpoint",
    "finish_run",
    "CKPT_DIR",
    "COMPLETE",
    "CONFIG_FILE",
    "HELDOUT_FILE",
    "LOCK_FILE",
    "Checkpoint",
    "check_out",
    "locked",
    "check_run_dir",
    "write_run_files",
    "find_checkpoint",
    "newest_checkpoint",
    "save_checkpoint",
]

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
HELDOUT_FILE = "heldout.txt"
LOCK_FILE = ".lock"
DAMAGED = ".damaged"  # suffix of a checkpoint directory moved aside


# ---------------------------------------------------------------------------------------------------------------
# The directory, its lock and its config
# ---------------------------------------------------------------------------------------------------------------


def check_out(run: Path) -> None:
    """UserError unless ``run`` is a directory or can be made one (checked before any expensive work)."""
    p = run
    while not p.exists() and p != p.parent:
        p = p.parent
    if p == run and not run.is_dir():
        raise UserError(f"--out {run}: exists and is not a directory")
    if not p.is_dir():
        raise UserError(f"--out {run}: cannot create it, {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"--out {run}: cannot create or write it, {p} is not writable")


@contextlib.contextmanager
def locked(run: Path, enabled: bool = True) -> Iterator[None]:
    """Create ``run`` and hold ``run/.lock`` exclusively while the block runs (``enabled``: the main rank)."""
    if not enabled:
        yield
        return
    try:
        run.mkdir(parents=True, exist_ok=True)
        fh = open(run / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"--out {run}: cannot create or lock the run directory ({e.strerror or e})") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(
                f"{run}: another training is writing this run directory ({holder} holds {run / LOCK_FILE}); "
                "wait for it to end or pass another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")  # for the message a second training gets
        fh.flush()
        yield  # closing the file releases the lock; so does the end of the process


# Config keys holding paths that may lie inside a run or pipeline directory (data.spec: a dataset directory)
_CONFIG_PATHS = (("data", "spec"), ("data", "root"), ("moe", "superclasses"), ("init_from",))


def _rebased(saved: Config, run: Path) -> Config:
    """``saved`` with its paths inside the directory that moved with RUN (RUN, or the pipeline directory holding
    it) rebased to where RUN is now, found from the ``out`` it records: a moved run resumes. config.yaml keeps
    the paths as given, since it is also loaded as a ``--config`` file, where a relative path means the cwd's."""
    run = Path(os.path.normpath(run.absolute()))
    old_run = Path(os.path.normpath(Path(saved.out).absolute())) if saved.out else run
    root = move_root(run)
    rel = run.relative_to(root)
    old_root = old_run
    for _ in rel.parts:
        old_root = old_root.parent
    if old_run == run or old_root / rel != old_run:
        return saved
    for keys in _CONFIG_PATHS:
        *up, leaf = keys
        node = saved
        for k in up:
            node = getattr(node, k)
        v = getattr(node, leaf)
        if v and Path(v).is_absolute() and Path(v).is_relative_to(old_root):
            setattr(node, leaf, str(root / Path(v).relative_to(old_root)))
    return saved


def _saved_config(run: Path) -> Config | None:
    """RUN/config.yaml, or the config in the newest checkpoint's state when the file is missing (rebased when
    RUN was moved)."""
    if (run / CONFIG_FILE).is_file():
        return _rebased(load_config(str(run / CONFIG_FILE)), run)
    found = find_checkpoint(run)
    if found is None or not isinstance(found[1].get("config"), dict):
        return None
    return _rebased(config_from_dict(found[1]["config"], f"{found[0] / STATE_FILE}: config"), run)


def check_run_dir(
    run: Path, cfg: Config, heldout: list[Sample], data_dir: Path
) -> dict[str, tuple[Any, Any]]:
    """Refuse to write into a run that holds checkpoints unless resuming, and a resume that changes more than
    ``RESUME_MAY_CHANGE`` or the held-out split. Returns the changes a resume makes. Reads only (every rank)."""
    if not cfg.resume:
        if checkpoint_dirs(run):
            raise UserError(f"{run} already holds checkpoints: pass --resume to continue, or another --out")
        return {}
    saved = _saved_config(run)
    changes = config_changes(saved, cfg) if saved is not None else {}
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        keys = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise UserError(
            f"--resume {run}: the config differs from {run / CONFIG_FILE} in {keys}; a resumed run may change "
            f"only {', '.join(sorted(RESUME_MAY_CHANGE))} (start a new run with another --out)"
        )
    heldout_file = run / HELDOUT_FILE
    if heldout_file.is_file():
        from .files.file_list import read_file_list

        if set(read_file_list(heldout_file, data_dir)) != set(heldout):
            raise UserError(f"{heldout_file}: differs from this config's held-out split; cannot resume")
    return {k: v for k, v in changes.items() if k != "resume"}


def write_run_files(run: Path, cfg: Config, heldout: list[Sample]) -> None:
    """RUN/config.yaml and RUN/heldout.txt (after every check passed), and no temporaries of a killed run."""
    from .files.file_list import write_file_list

    if (run / CKPT_DIR).is_dir():
        for stale in (run / CKPT_DIR).glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # temporaries of a killed checkpoint write
    write_text_atomic(run / CONFIG_FILE, dump_yaml(cfg))
    write_file_list(run / HELDOUT_FILE, heldout)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    dir: Path
    state: dict[str, Any]  # step, epoch, optimizer, ... (see save_checkpoint's caller)
    weights: dict[str, torch.Tensor]  # the trained model's state dict, on the CPU


def checkpoint_dirs(run: Path) -> list[Path]:
    """``RUN/checkpoints/step_*`` directories, oldest first, complete or not."""
    d = run / CKPT_DIR
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _read_checkpoint(d: Path) -> Checkpoint:
    """Both files of a checkpoint, fully read; any failure means the checkpoint is damaged."""
    from safetensors.torch import load_file

    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
        raise ValueError(f"{STATE_FILE} lacks step/optimizer")
    return Checkpoint(d, state, load_file(str(d / MODEL_FILE), device="cpu"))


def _move_aside(d: Path) -> Path:
    aside = d.with_name(d.name + DAMAGED)
    shutil.rmtree(aside, ignore_errors=True)  # an older damaged copy of the same step
    try:
        d.rename(aside)
    except OSError:  # cannot rename: at least it must not count as complete
        (d / COMPLETE).unlink(missing_ok=True)
        return d
    return aside


def _checkpoints(run: Path, move_damaged: bool) -> Iterator[Checkpoint]:
    """Readable complete checkpoints, newest first; torn ones are skipped and damaged ones warned about (and
    moved aside when ``move_damaged``: only the process holding the run's lock may)."""
    for d in reversed(checkpoint_dirs(run)):
        if not (d / COMPLETE).is_file():
            log.warning("skipping checkpoint %s: no %s marker (torn or partial write)", d, COMPLETE)
            continue
        try:
            ck = _read_checkpoint(d)
        except Exception as e:  # noqa: BLE001  a damaged file in a marked directory: fall back to an older one
            where = f"; moved aside to {_move_aside(d)}" if move_damaged else ""
            log.warning("checkpoint %s is damaged (%s)%s; trying the next older one", d, e, where)
            continue
        yield ck


def find_checkpoint(run: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """Newest complete checkpoint of a run whose weights and state both read, as (dir, state); read-only."""
    ck = next(_checkpoints(Path(run), move_damaged=False), None)
    return (ck.dir, ck.state) if ck is not None else None


def newest_checkpoint(run: Path, move_damaged: bool) -> Checkpoint | None:
    """As ``find_checkpoint``, with the weights; damaged checkpoints are moved aside when ``move_damaged``."""
    return next(_checkpoints(run, move_damaged), None)


def save_checkpoint(
    run: Path, step: int, model: nn.Module, meta: ModelMeta, state: dict[str, Any], keep_last: int
) -> Path:
    """RUN/checkpoints/step_<step>/ (atomic, COMPLETE last); keeps the newest ``keep_last`` complete ones."""
    final = run / CKPT_DIR / f"step_{step:08d}"
    if (final / COMPLETE).is_file():
        return final
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_model(tmp / MODEL_FILE, model, meta, move_root(run))
        torch.save(state, tmp / STATE_FILE)
        (tmp / COMPLETE).write_text(f"step {step}\n")  # last: a directory with it is whole
    complete = [d for d in checkpoint_dirs(run) if (d / COMPLETE).is_file()]
    for old in complete[: max(0, len(complete) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def finish_run(
    run: Path,
    model: nn.Module,
    ema: nn.Module | None,
    meta: ModelMeta,
    rank: int,
    world: int,
    step: int,
    dump_replicas: bool = False,
) -> None:
    """RUN/model.safetensors from the main rank (the EMA's weights when there is one: what DeiT reports and
    deploys), then the process group down. ``dump_replicas``: every other rank writes its own copy (tests)."""
    import torch.distributed as dist

    meta.train.ema, meta.train.step = ema is not None, step
    if rank == 0:
        save_model(run / MODEL_FILE, ema if ema is not None else model, meta, move_root(run))
        log.info("wrote %s", run / MODEL_FILE)
    elif dump_replicas:
        save_model(run / f"replica_rank{rank}.safetensors", model, meta, move_root(run))
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def restore_checkpoint(ck: Checkpoint, model: nn.Module, recipe: Any, steps_per_epoch: int) -> None:
    """Load a checkpoint's weights, optimizer, scaler and EMA into this run's; a checkpoint of another data
    layout or model is a UserError, not damage."""
    if ck.state.get("steps_per_epoch") != steps_per_epoch:
        raise UserError(
            f"{ck.dir}: saved with {ck.state.get('steps_per_epoch')} steps per epoch, this config gives "
            f"{steps_per_epoch} (batch size, world size or data changed); cannot resume"
        )
    try:
        model.load_state_dict(ck.weights)
        recipe.optimizer.load_state_dict(ck.state["optimizer"])
        if recipe.scaler is not None and ck.state.get("scaler"):
            recipe.scaler.load_state_dict(ck.state["scaler"])
        if recipe.ema is not None and ck.state.get("ema"):
            recipe.ema.module.load_state_dict(ck.state["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(
            f"{ck.dir}: does not fit this run's model or optimizer ({e}); cannot resume"
        ) from None
