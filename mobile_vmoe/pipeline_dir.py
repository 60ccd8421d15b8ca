"""The pipeline directory (``mobile-vmoe pipeline --out OUT``): which stages are done, what a redo deletes.

    OUT/pipeline.yaml          the resolved config (its presence makes OUT a pipeline directory)
    OUT/stages/<stage>.json    a finished stage's StageMarker (files.stage_marker): the outputs it vouches for,
                               relative to OUT, and the stage's summary record (below) as its ``result``, whose
                               paths inside OUT are stored relative to OUT too (common.store_path): a moved or
                               copied OUT resumes with nothing redone
    OUT/.lock                  flock-ed by the run that writes OUT

``run_stages`` drives either pipeline (its object has one method per stage, each returning a StageDone). Under
torchrun the stages of ``StagePlan.every_rank`` (data, trainings: DDP) run on every rank; the others run on rank
0, which alone takes the lock and writes markers, while the other ranks wait until rank 0 has checked OUT and
deleted what this run redoes (a key in torchrun's store), then follow rank 0's markers and return after the last
every-rank stage.

A stage is done when its marker exists, holds its summary record, and every output it vouches for is there.
Redoing a stage deletes exactly the outputs its marker lists (never anything else), then the marker; a
generated dataset (stage data) is kept, since prepare_dataset rebuilds it when incomplete or changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from .common import PIPELINE_YAML, UserError, load_path, store_path, write_text_atomic
from .config import config_to_dict, dump_yaml
from .files.stage_marker import StageMarker, marker_path, read_marker, write_marker

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER", "STAGES", "SUMMARIES", "BenchSummary", "ConfusionSummary", "DataSummary", "EvalSummary",
    "ExportSummary", "LIMOE", "LIMOE_MODELS", "LIMOE_STAGES", "LimoeEvalSummary", "StagePlan",
    "check_config_change", "check_out_dir", "ReportSummary", "SuperclassSummary", "TrainSummary", "capacity_export_name", "changed_keys", "is_pipeline_dir", "locked",
    "not_done", "prepare", "read_summary", "run_stages", "StageDone", "summary_result", "wait_for",
]  # fmt: skip

STAGES = ("data", "dense", "confusion", "superclasses", "moe", "vmoe", "eval", "export", "bench", "report")
LOCK_FILE = ".lock"
# a generated dataset is kept on a redo: prepare_dataset rebuilds it when incomplete or changed
KEEP_ON_REDO = ("data",)
RANK0_WAIT_S = 24 * 3600  # how long ranks > 0 wait for rank 0's single-process stages


def capacity_export_name(which: str, capacity_ratio: float) -> str:
    """The per-token model's .pte exported at an inference capacity ratio: ``vmoe_c0.5.pte``."""
    return f"{which}_c{capacity_ratio:g}.pte"


# ---------------------------------------------------------------------------------------------------------------
# What each stage's marker records (StageMarker.result); the report reads them back with read_summary
# ---------------------------------------------------------------------------------------------------------------

# a summary field holding a path (or a dict of them): absolute in memory, relative to OUT on disk when inside it
PATH = {"path": True}


@dataclass
class DataSummary:
    data_dir: str = field(metadata=PATH)
    num_classes: int
    train: int  # training images, held-out ones included
    val: int


@dataclass
class TrainSummary:
    run: str = field(metadata=PATH)  # "" for a model the config leaves out
    model_file: str = field(metadata=PATH)


@dataclass
class ConfusionSummary:
    heldout_images: int
    accuracy: float
    empty_classes: list[str]  # classes without held-out images


@dataclass
class SuperclassSummary:
    file: str = field(metadata=PATH)
    within_mass: float | None
    ari_vs_truth: float | None
    warnings: list[str]


@dataclass
class EvalSummary:
    top1: dict[str, float]  # by model: dense, moe, vmoe
    top5: dict[str, float]
    num_images: dict[str, int]
    capacity_curves: dict[str, str] = field(
        metadata=PATH
    )  # per-token models: the accuracy vs capacity curve (files.capacity_curve)


@dataclass
class ExportSummary:
    artifacts: dict[str, str] = field(metadata=PATH)  # file name -> path
    failed_verification: dict[str, str]  # file name -> why (int8 only; the others are fatal)


@dataclass
class BenchSummary:
    results: dict[str, str] = field(metadata=PATH)  # artifact file name -> bench result JSON


@dataclass
class ReportSummary:
    markdown: str = field(metadata=PATH)
    html: str = field(metadata=PATH)


SUMMARIES: dict[str, type] = {
    "data": DataSummary, "dense": TrainSummary, "confusion": ConfusionSummary,
    "superclasses": SuperclassSummary, "moe": TrainSummary, "vmoe": TrainSummary, "eval": EvalSummary, "export": ExportSummary,
    "bench": BenchSummary, "report": ReportSummary,
}  # fmt: skip


class StagePlan(NamedTuple):
    """A pipeline's stages in order, each one's summary record and the stages every torchrun rank runs (the
    classifier's, or the image-text one of ``pipeline_limoe``): every function below takes one, the classifier
    pipeline's by default."""

    stages: tuple[str, ...]
    summaries: Mapping[str, type]
    # Data (each rank may need it) and the trainings (DDP); the rest: rank 0 alone.
    every_rank: tuple[str, ...]


class StageDone(NamedTuple):
    """What a stage method returns."""

    outputs: list[Path]  # what the stage's marker vouches for (and what a redo deletes)
    summary: Any  # the stage's summary record (plan.summaries[stage])


CLASSIFIER = StagePlan(STAGES, SUMMARIES, ("data", "dense", "moe", "vmoe"))


# The image-text pipeline (``pipeline_limoe``): LIMoE, LIMoE without entropy losses and the two dense baselines.
LIMOE_MODELS = ("limoe", "limoe_no_entropy", "onetower", "clip")
LIMOE_STAGES = ("data", *LIMOE_MODELS, "eval", "export", "bench", "report")


@dataclass
class LimoeEvalSummary:
    files: dict[str, str] = field(metadata=PATH)  # model -> its evaluation (files.image_text_eval)
    zero_shot_top1: dict[str, float | None]  # None: the caption set has no labels or class names
    image_to_text_r1: dict[str, float]


LIMOE = StagePlan(LIMOE_STAGES, {
    "data": DataSummary, **dict.fromkeys(LIMOE_MODELS, TrainSummary), "eval": LimoeEvalSummary,
    "export": ExportSummary, "bench": BenchSummary, "report": ReportSummary,
}, ("data", *LIMOE_MODELS))  # fmt: skip


def _paths(summary: Any, convert: Any) -> Any:
    """``summary`` with ``convert`` applied to each path of its PATH fields ("" stays "": no model)."""
    out = asdict(summary)
    for f in fields(summary):
        if f.metadata.get("path"):
            v = out[f.name]
            out[f.name] = {k: convert(p) for k, p in v.items()} if isinstance(v, dict) else convert(v)
    return type(summary)(**out)


def summary_result(out: Path, summary: Any) -> dict[str, Any]:
    """What a marker of OUT records of ``summary`` (its ``result``): paths inside OUT relative to OUT."""
    return asdict(_paths(summary, lambda p: store_path(p, out, out) if p else ""))


def _summary(m: StageMarker, plan: StagePlan, out: Path) -> Any:
    """The stage's summary record (paths absolute), or None when the marker predates it (its stage is then
    redone). Markers of older versions hold absolute paths: they still load."""
    cls = plan.summaries[m.stage]
    if set(m.result) != {f.name for f in fields(cls)}:
        return None
    return _paths(cls(**m.result), lambda p: str(load_path(p, out)) if p else "")


def read_summary(out: str | os.PathLike[str], stage: str, plan: StagePlan = CLASSIFIER) -> Any:
    """The summary record a finished stage left in its marker, or None if the stage has not finished."""
    m = read_marker(out, stage)
    return _summary(m, plan, Path(out)) if m is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Which stages are done, what a redo deletes, the lock
# ---------------------------------------------------------------------------------------------------------------


def _inside(out: Path, rel: str, where: Path) -> Path:
    """An output path of a marker, refused unless it is strictly inside OUT (a marker must not reach out)."""
    p = out / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or p == out or rel in (PIPELINE_YAML, LOCK_FILE):
        raise UserError(f"{where}: output {rel!r} is not a path inside the pipeline directory {out}")
    return p


def not_done(out: Path, stage: str, plan: StagePlan = CLASSIFIER) -> str | None:
    """Why ``stage`` is not done (no marker, an old marker, outputs gone), or None when it is."""
    m = read_marker(out, stage)
    if m is None:
        return "no marker"
    for rel in m.outputs:
        _inside(out, rel, marker_path(out, stage))
    if _summary(m, plan, out) is None:
        return "its marker was written by an older mobile-vmoe"
    missing = m.missing_outputs(out)
    if missing:
        return f"its output {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} is gone"
    return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        trash = p.with_name(f".{p.name}.trash")  # rename first: a half-deleted dir never looks like output
        shutil.rmtree(trash, ignore_errors=True)
        p.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _forget(out: Path, stage: str) -> None:
    """Delete what ``stage``'s marker vouches for (nothing else), then the marker."""
    m = read_marker(out, stage)
    if m is None:
        return
    if stage not in KEEP_ON_REDO:
        for rel in m.outputs:
            _remove(_inside(out, rel, marker_path(out, stage)))
    marker_path(out, stage).unlink()


def _default_outputs(out: Path, stage: str) -> list[Path]:
    """Where a stage writes: an unfinished stage (no marker) may have left files there."""
    if stage == "report":
        return [out / "report.md", out / "report.html", out / "report_files"]
    return [] if stage == "data" else [out / stage]


def changed_keys(out: Path, cfg: Any) -> list[str]:
    """The config keys in which OUT/pipeline.yaml differs from ``cfg`` (none when there is no pipeline.yaml)."""
    import yaml

    saved = out / PIPELINE_YAML
    if not saved.is_file() or saved.read_text() == dump_yaml(cfg):
        return []
    old = yaml.safe_load(saved.read_text()) or {}
    new = config_to_dict(cfg)
    # a key added to the config since OUT was made counts as its default there
    default = config_to_dict(type(cfg)())
    return sorted(k for k in set(old) | set(new) if old.get(k, default.get(k)) != new.get(k))


def _check_from(out: Path, start: str, plan: StagePlan) -> None:
    """``--from start``: the earlier stages are done, and no later stage left files a redo could not delete."""
    i = plan.stages.index(start)
    for stage in plan.stages[:i]:
        why = not_done(out, stage, plan)
        if why is not None:
            raise UserError(
                f"--from {start}: needs stage {stage}, but {why} ({marker_path(out, stage)}); "
                f"run without --from, or with --from {stage}"
            )
    for stage in plan.stages[i:]:
        left = [p for p in _default_outputs(out, stage) if p.exists()]
        if read_marker(out, stage) is None and left:
            raise UserError(
                f"--from {start}: {left[0]} holds an unfinished stage {stage} (no marker), which --from cannot "
                f"tell from your files: delete it, or run without --from to continue it"
            )


def prepare(out: Path, cfg: Any, start: str | None, plan: StagePlan = CLASSIFIER) -> str | None:
    """Check the stages against ``start``, delete what will be redone, write pipeline.yaml. Returns the first
    stage to run (None: every stage is done). The caller holds the lock and has checked the config change."""
    if start is not None:
        _check_from(out, start, plan)
        first: str | None = start
    else:
        first = next((s for s in plan.stages if not_done(out, s, plan) is not None), None)
        why = not_done(out, first, plan) if first is not None else None
        if why is not None and why != "no marker":
            log.info("[%s] done before, but %s: redoing it and every later stage", first, why)
    if first is not None:
        for stage in plan.stages[plan.stages.index(first) :]:
            _forget(out, stage)
    write_text_atomic(out / PIPELINE_YAML, dump_yaml(cfg))
    return first


def is_pipeline_dir(out: Path) -> bool:
    return (out / PIPELINE_YAML).is_file()


def check_out_dir(out: Path, start: str | None) -> None:
    """OUT is a pipeline directory, or new / empty (then ``--from`` has nothing to redo): before the lock."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if is_pipeline_dir(out):
        return
    if start is not None:
        raise UserError(
            f"--from {start}: {out} is not a pipeline directory (no {PIPELINE_YAML}); nothing was deleted"
        )
    if out.is_dir() and any(c.name != LOCK_FILE for c in out.iterdir()):
        raise UserError(
            f"--out {out}: not empty and not a pipeline directory (no {PIPELINE_YAML}); use a new or "
            f"empty directory"
        )


def check_config_change(
    out: Path, cfg: Any, start: str | None, first_stage: Mapping[str, str], scheduling: set[str],
    plan: StagePlan = CLASSIFIER,
) -> None:  # fmt: skip
    """A changed config must be redone from the first stage it changes (``first_stage``: key -> stage) or
    earlier; ``scheduling`` keys change how a stage runs, not what it writes, and never force a redo."""
    need = first_changed_stage(out, cfg, first_stage, scheduling, plan)
    stages = plan.stages
    if need is not None and (start is None or stages.index(start) > stages.index(need)):
        changed = [k for k in changed_keys(out, cfg) if k not in scheduling]
        raise UserError(
            f"{out / PIPELINE_YAML}: this run was made with another config (differs in {', '.join(changed)}); "
            f"pass --from {need} (or an earlier stage) to redo from the first stage it changes, or use "
            f"another --out"
        )


def first_changed_stage(
    out: Path, cfg: Any, first_stage: Mapping[str, str], scheduling: set[str], plan: StagePlan = CLASSIFIER
) -> str | None:
    """The earliest stage ``cfg`` changes against the run in ``out`` (None: nothing to redo, or no run yet)."""
    changed = [k for k in changed_keys(out, cfg) if k not in scheduling]
    if not changed:
        return None
    stages = plan.stages
    return stages[min(stages.index(first_stage.get(k, stages[0])) for k in changed)]


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold OUT/.lock (flock) while this run writes OUT; a second run gets a UserError at once."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(
                f"{out}: another pipeline run is writing this directory ({holder}, lock {lock}); wait for it "
                f"to finish or use another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wait_for(out: Path, stage: str, plan: StagePlan = CLASSIFIER) -> None:
    """Ranks > 0 under torchrun wait here while rank 0 runs a single-process stage."""
    _wait(
        lambda: not_done(out, stage, plan) is None,
        f"rank 0 to finish stage {stage} ({marker_path(out, stage)})",
    )


def _wait(ready: Any, what: str) -> None:
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > RANK0_WAIT_S:
            raise UserError(f"waited 24 h for {what}")
        time.sleep(2)


# ---------------------------------------------------------------------------------------------------------------
# The stage driver of both pipelines
# ---------------------------------------------------------------------------------------------------------------


def run_stages(
    pipeline: Any, out: Path, cfg: Any, start: str | None, plan: StagePlan, first_stage: Mapping[str, str],
    scheduling: set[str],
) -> None:  # fmt: skip
    """Run every unfinished stage of ``plan`` into ``out`` (``start``: redo from that stage on), calling the
    method of ``pipeline`` named after each stage. Rank 0 (or a run without torchrun) checks OUT, takes the lock
    and writes the markers; ranks > 0 take no lock and follow rank 0 (``_follow``). The caller has checked
    ``start`` and the config (``first_stage``, ``scheduling``: see ``check_config_change``)."""
    store = _torchrun_store()
    if int(os.environ.get("RANK", "0")) != 0:
        _follow(pipeline, out, plan, store)
        return
    check_out_dir(out, start)
    with locked(out):
        check_config_change(out, cfg, start, first_stage, scheduling, plan)
        first = prepare(out, cfg, start, plan)
        if store is not None:
            store.set(_prepared_key(), "1")  # the other ranks may read the markers now
        for i, stage in enumerate(plan.stages):
            if first is None or i < plan.stages.index(first):
                log.info("[%s] done before, skipped", stage)
                continue
            log.info("[%s] ...", stage)
            t0 = time.perf_counter()
            done: StageDone = getattr(pipeline, stage)()
            seconds = round(time.perf_counter() - t0, 2)
            rel = [p.relative_to(out).as_posix() for p in done.outputs]
            write_marker(out, StageMarker(stage, seconds, rel, summary_result(out, done.summary)))
            log.info("[%s] done in %.1f s", stage, seconds)


def _follow(pipeline: Any, out: Path, plan: StagePlan, store: Any) -> None:
    """A rank > 0, once rank 0 has prepared OUT: each stage up to the last every-rank one that rank 0 has not
    finished is run here too when it is an every-rank stage (the trainings meet rank 0 in their process group),
    then its marker awaited; the later stages are rank 0's alone."""
    # before rank 0's prepare, OUT may be unchecked (nothing must be written) and may hold the markers of the
    # stages a --from (or a changed config) is about to redo
    if store is not None:
        store.wait([_prepared_key()], timedelta(seconds=RANK0_WAIT_S))
    else:  # no torchrun store to hear it from: OUT a pipeline directory (a --from run is then racy)
        _wait(lambda: is_pipeline_dir(out), f"rank 0 to check and prepare {out} (its {PIPELINE_YAML})")
    last = max(plan.stages.index(s) for s in plan.every_rank)
    for stage in plan.stages[: last + 1]:
        if not_done(out, stage, plan) is None:
            continue
        if stage in plan.every_rank:
            getattr(pipeline, stage)()
        wait_for(out, stage, plan)


def _torchrun_store() -> Any:
    """torchrun's store (its agent's: it outlives the trainings' process groups), None without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=RANK0_WAIT_S)))
    return store


def _prepared_key() -> str:
    """Set by rank 0 once OUT is checked and what this run redoes is deleted; one per torchrun (re)start."""
    return f"mobile_vmoe/pipeline_prepared/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
