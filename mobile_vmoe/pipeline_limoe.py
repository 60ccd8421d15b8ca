"""`mobile-vmoe pipeline --preset limoe`: LIMoE and its three baselines, trained, evaluated zero-shot, exported,
benchmarked and reported in one resumable command.

    mobile-vmoe pipeline --preset limoe                       # built-in caption set (training ~4.5 min alone)
    mobile-vmoe pipeline --preset limoe_quick --out runs/lq   # smoke run (< 3 min), no accuracy claim
    mobile-vmoe pipeline --preset limoe --data captions.csv   # a caption table, shards or a folder of them

A pipeline preset or file with ``kind: image_text`` lands here (``pipeline.py`` dispatches); the directory
machinery is the classifier pipeline's (``pipeline_dir``: markers, summaries, lock, resume, ``--from``, a changed
config refused, bad config before any stage), with this stage plan:

    data              the caption set (the built-in one is generated)    OUT/data/ or the --data source
    limoe             LIMoE (one tower, sparse MoE, entropy losses)      OUT/limoe/              (train)
    limoe_no_entropy  the same LIMoE without its entropy losses          OUT/limoe_no_entropy/   (train)
    onetower          the dense one-tower model                          OUT/onetower/           (train)
    clip              the dense two-tower CLIP                           OUT/clip/               (train)
    eval              zero-shot, retrieval, routing of each              OUT/eval/<model>.json   (eval)
    export            each model's zero-shot classifier in each format,  OUT/export/             (export)
                      LIMoE's text encoder .pte (limoe_text.pte)
    bench             host latency of the .pte / .onnx artifacts         OUT/bench/              (bench)
    report            report.md / report.html (``report_limoe``)         OUT/report.*            (report)

The four models share the data, the training preset (recipe, batch, steps, seed) and, by their sizes, the
compute per example; they differ only in the model name and, for ``limoe_no_entropy``,
``image_text.entropy_losses=false``.

Under torchrun (``torchrun --nproc-per-node N -m mobile_vmoe.cli pipeline --preset limoe``) the data and the four
trainings run on every rank (DDP: ``batch_size`` is the global batch, split over the ranks); eval, export, bench
and report run on rank 0, which alone takes the lock and writes the markers, while the other ranks follow its
markers and exit after the last training (``pipeline_dir.run_stages``; OUT must be on a file system every node
sees).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .common import UserError
from .config import Config, load_config, load_structured
from .pipeline_dir import (
    LIMOE,
    LIMOE_MODELS,
    LIMOE_STAGES,
    BenchSummary,
    DataSummary,
    ExportSummary,
    LimoeEvalSummary,
    ReportSummary,
    StageDone,
    TrainSummary,
    read_summary,
    run_stages,
)

log = logging.getLogger(__name__)

__all__ = [
    "FIRST_STAGE", "IMAGE_TEXT_KIND", "LIMOE_PLAN", "LimoeArtifact", "LimoeEvalSummary", "LimoePipelineConfig",
    "MODELS", "STAGES", "is_image_text_pipeline", "limoe_artifacts", "limoe_train_config",
    "load_limoe_pipeline_config", "run_limoe_pipeline",
]  # fmt: skip

IMAGE_TEXT_KIND = "image_text"  # the ``kind`` of an image-text pipeline preset
MODELS = LIMOE_MODELS
STAGES = LIMOE_STAGES
LIMOE_PLAN = LIMOE  # the stage plan and summaries (pipeline_dir owns the markers)
EXT = {"pte": ".pte", "coreml": ".mlpackage", "onnx": ".onnx"}


@dataclass
class LimoePipelineConfig:
    name: str = "limoe"
    kind: str = IMAGE_TEXT_KIND
    train: str = "limoe_synthetic"  # training preset (or YAML file) shared by the four models
    data: str = ""  # "": the training preset's data.spec (the built-in caption set); else a caption source
    limoe_model: str = "mobile_limoe_nano_patch8_32"  # also the model of limoe_no_entropy
    onetower_model: str = "mobile_onetower_nano_patch8_32"
    clip_model: str = "mobile_clip_nano_patch8_32"
    train_overrides: list[str] = field(default_factory=list)  # key=value for the four trainings
    formats: list[str] = field(default_factory=lambda: ["pte", "coreml", "onnx"])
    text_encoder: bool = True  # also LIMoE's text encoder as .pte (with pte in formats)
    num_verify: int = 100  # images (texts) each export is checked on
    export_workers: int = 2
    eval_batch_size: int = 256
    bench_warmup: int = 10
    bench_iterations: int = 50
    bench_threads: int = 0  # 0: the runtime's default
    seed: int = 0


# The first stage each config key changes (see pipeline_config.FIRST_STAGE).
FIRST_STAGE = {
    "name": "limoe", "kind": "data", "train": "data", "data": "data", "train_overrides": "data",
    "limoe_model": "limoe", "onetower_model": "onetower", "clip_model": "clip", "seed": "limoe",
    "eval_batch_size": "eval", "formats": "export", "text_encoder": "export", "num_verify": "export",
    "bench_warmup": "bench", "bench_iterations": "bench", "bench_threads": "bench",
}  # fmt: skip
SCHEDULING_KEYS = {"export_workers"}


def is_image_text_pipeline(preset_or_file: str) -> bool:
    """Whether a pipeline preset or file says ``kind: image_text`` (read before its keys are checked)."""
    from .config import load_source

    d, _ = load_source(preset_or_file, kind="pipeline")
    return d.get("kind") == IMAGE_TEXT_KIND


def load_limoe_pipeline_config(
    preset_or_file: str = "limoe", overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """An image-text pipeline preset (``limoe``, ``limoe_quick``) or YAML file, then ``key=value`` overrides."""
    return load_structured(LimoePipelineConfig, preset_or_file, overrides, kind="pipeline")


def limoe_train_config(cfg: LimoePipelineConfig, out: Path, which: str) -> Config:
    """The training config of model ``which`` (one of MODELS) of a pipeline writing to ``out``."""
    extra = ["image_text.entropy_losses=false"] if which == "limoe_no_entropy" else []
    tcfg = load_config(cfg.train, [*cfg.train_overrides, *extra])
    tcfg.model = {"limoe": cfg.limoe_model, "limoe_no_entropy": cfg.limoe_model,
                  "onetower": cfg.onetower_model, "clip": cfg.clip_model}[which]  # fmt: skip
    tcfg.name, tcfg.seed, tcfg.out = f"{cfg.name}-{which}", cfg.seed, str(out / which)
    if cfg.data and cfg.data != tcfg.data.spec:
        tcfg.data.dataset_kwargs = {}  # the preset's generator options are for its own set
        tcfg.data.spec = cfg.data
    if tcfg.data.root == "data":
        tcfg.data.root = str(out / "data")  # a generated caption set lives with the run
    return tcfg


class LimoeArtifact(NamedTuple):
    model: str  # one of MODELS
    format: str  # pte | coreml | onnx
    part: str  # "image" (the zero-shot classifier) | "text" (the text encoder)
    path: Path


def limoe_artifacts(cfg: LimoePipelineConfig, out: Path) -> list[LimoeArtifact]:
    """Every artifact of the export stage: each model's zero-shot classifier in each format, then LIMoE's text
    encoder .pte."""
    arts = [
        LimoeArtifact(w, f, "image", out / "export" / f"{w}{EXT[f]}") for w in MODELS for f in cfg.formats
    ]
    if cfg.text_encoder and "pte" in cfg.formats:
        arts.append(LimoeArtifact("limoe", "pte", "text", out / "export" / "limoe_text.pte"))
    return arts


class _LimoePipeline:
    def __init__(self, cfg: LimoePipelineConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out

    def summary(self, stage: str) -> Any:
        s = read_summary(self.out, stage, LIMOE_PLAN)
        if s is None:
            raise UserError(f"stage {stage} has not finished ({self.out / 'stages' / stage}.json)")
        return s

    def check(self) -> None:
        """Everything a later stage would reject, checked before the first stage runs."""
        import timm

        import mobile_vmoe.models  # noqa: F401  (registers the model names)

        from .builtin_captions import BUILTIN_CAPTIONS
        from .captions import is_caption_source
        from .config import model_kwargs
        from .models.names import image_text_models
        from .train_image_text import check_image_text_config

        c = self.cfg
        if c.kind != IMAGE_TEXT_KIND:
            raise UserError(f"pipeline config kind: expected {IMAGE_TEXT_KIND!r}, got {c.kind!r}")
        want = {"limoe": "a LIMoE (mobile_limoe_*)", "onetower": "a dense one-tower model (mobile_onetower_*)",
                "clip": "a dense two-tower model (mobile_clip_*)"}  # fmt: skip
        for which in ("limoe", "onetower", "clip"):
            tcfg = limoe_train_config(c, self.out, which)
            if tcfg.model not in image_text_models():
                raise UserError(
                    f"pipeline config {which}_model: {tcfg.model!r} is not a registered image-text model; "
                    f"expected {want[which]} (an image-text pipeline trains no classifier)"
                )
            check_image_text_config(tcfg)  # the image_text keys of train_overrides
            m = timm.create_model(tcfg.model, **model_kwargs(tcfg))
            kind = "limoe" if m.is_moe else ("clip" if m.two_tower else "onetower")
            if kind != which:
                raise UserError(f"pipeline config {which}_model: {tcfg.model!r} is not {want[which]}")
        spec = limoe_train_config(c, self.out, "limoe").data.spec
        if spec not in BUILTIN_CAPTIONS and not Path(spec).exists():
            raise UserError(
                f"--data {spec}: no such caption source (nor a built-in set: {', '.join(BUILTIN_CAPTIONS)})"
            )
        if not is_caption_source(spec):
            raise UserError(
                f"--data {spec}: not a caption set; an image-text pipeline trains on image-caption pairs: a "
                ".csv/.tsv table, .tar shards or a folder of them (docs/FILES.md), not an image-classification "
                "dataset"
            )
        bad = sorted(set(c.formats) - set(EXT))
        if bad:
            raise UserError(f"pipeline config formats: unknown {bad}; expected a list of pte, coreml, onnx")
        if c.num_verify < 1 or c.bench_iterations < 1 or c.bench_warmup < 0 or c.eval_batch_size < 1:
            raise UserError(
                "pipeline config: num_verify, bench_iterations and eval_batch_size must be >= 1, "
                "bench_warmup >= 0"
            )

    # ---- stages ------------------------------------------------------------------------------------------
    def data(self) -> StageDone:
        from .builtin_captions import BUILTIN_CAPTIONS, prepare_caption_set
        from .captions import caption_splits, is_caption_source, read_caption_set
        from .files.captions import CaptionColumns

        t = limoe_train_config(self.cfg, self.out, "limoe")
        kw = dict(t.data.dataset_kwargs)
        seed = int(kw.pop("seed", 0))
        d = prepare_caption_set(t.data.spec, t.data.root, seed, **kw).absolute()
        if not is_caption_source(str(d)):
            raise UserError(
                f"--data {d}: not a caption set (a .csv/.tsv table, .tar shards or a folder of them)"
            )
        it = t.image_text
        columns = CaptionColumns(it.csv_img_key, it.csv_caption_key, it.csv_label_key)
        splits = [
            read_caption_set(s, columns, it.csv_separator, verify_images=False) for s in caption_splits(d)
        ]
        classes = splits[-1].classes or splits[0].classes
        generated = t.data.spec in BUILTIN_CAPTIONS and d.is_relative_to(self.out)
        val = len(splits[1]) if len(splits) > 1 else 0
        n_classes = len(classes.class_names) if classes else 0
        return StageDone([d] if generated else [], DataSummary(str(d), n_classes, len(splits[0]), val))

    def _train(self, which: str) -> StageDone:
        from .checkpoint import MODEL_FILE
        from .train import find_checkpoint
        from .train_image_text import train_image_text

        tcfg = limoe_train_config(self.cfg, self.out, which)
        tcfg.resume = find_checkpoint(tcfg.out) is not None  # an interrupted run continues
        if tcfg.resume and int(os.environ.get("RANK", "0")) == 0:
            log.info("[%s] continuing the interrupted run in %s", which, tcfg.out)
        run = train_image_text(tcfg)
        return StageDone(
            [run, run / MODEL_FILE, run / "config.yaml"], TrainSummary(str(run), str(run / MODEL_FILE))
        )

    def limoe(self) -> StageDone:
        return self._train("limoe")

    def limoe_no_entropy(self) -> StageDone:
        return self._train("limoe_no_entropy")

    def onetower(self) -> StageDone:
        return self._train("onetower")

    def clip(self) -> StageDone:
        return self._train("clip")

    def eval(self) -> StageDone:
        from .evaluate_image_text import evaluate_image_text

        s = LimoeEvalSummary({}, {}, {})
        outputs = [self.out / "eval"]
        for which in MODELS:
            f = self.out / "eval" / f"{which}.json"
            ev = evaluate_image_text(self.out / which, batch_size=self.cfg.eval_batch_size, json_out=f)
            outputs.append(f)
            s.files[which] = str(f)
            s.zero_shot_top1[which] = ev.zero_shot.top1 if ev.zero_shot is not None else None
            s.image_to_text_r1[which] = ev.retrieval.image_to_text_r1
            log.info("[eval] %s: zero-shot top-1 %s", which, s.zero_shot_top1[which])
        return StageDone(outputs, s)

    def export(self) -> StageDone:
        from .checkpoint import MODEL_FILE
        from .export.parallel import ExportJob, export_many
        from .files.sidecar import exported_from, sidecar_path

        s = ExportSummary({}, {})
        (self.out / "export").mkdir(parents=True, exist_ok=True)  # also with formats=[]
        jobs = []
        digests: dict[Path, str] = {}  # each model file hashed once for all its artifacts
        for which, fmt, part, path in limoe_artifacts(self.cfg, self.out):
            if exported_from(path, self.out / which / MODEL_FILE, digests):
                s.artifacts[path.name] = str(path)  # finished before an interruption, from this model
                continue
            kw = dict(checkpoint=str(self.out / which / MODEL_FILE), part=part, num_verify=self.cfg.num_verify,
                      seed=self.cfg.seed, verbose=False)  # fmt: skip
            jobs.append(ExportJob(fmt, str(path), kw))
        for i, (job, error) in enumerate(export_many(jobs, self.cfg.export_workers), start=1):
            log.info("[export] %d/%d %s", i, len(jobs), Path(job.out).name)
            if error is not None:
                raise error  # fp32 only: a failed check is a bug, not a precision trade-off
            s.artifacts[Path(job.out).name] = job.out
        done = [Path(p) for p in s.artifacts.values()]
        return StageDone([self.out / "export", *done, *map(sidecar_path, done)], s)

    def bench(self) -> StageDone:
        from .bench import bench

        exported = self.summary("export").artifacts
        s = BenchSummary({})
        (self.out / "bench").mkdir(parents=True, exist_ok=True)  # the marker vouches for it, results or not
        todo = [a.path for a in limoe_artifacts(self.cfg, self.out)
                if a.format != "coreml" and a.path.name in exported]  # fmt: skip
        for i, path in enumerate(todo, start=1):  # Core ML predicts only on Apple hardware: ios_bench/
            log.info("[bench] %d/%d %s", i, len(todo), path.name)
            res = self.out / "bench" / f"{path.name}.json"
            # generated inputs: the exports have static shapes, so latency does not depend on the pixels
            bench(path, warmup=self.cfg.bench_warmup, iterations=self.cfg.bench_iterations,
                  threads=self.cfg.bench_threads or None, json_out=res)  # fmt: skip
            s.results[path.name] = str(res)
        return StageDone([self.out / "bench", *map(Path, s.results.values())], s)

    def report(self) -> StageDone:
        from .report_common import FILES
        from .report_limoe import write_limoe_report

        paths = write_limoe_report(self.out)
        md, html = paths["markdown"], paths["html"]
        return StageDone([md, html, self.out / FILES], ReportSummary(str(md), str(html)))


def run_limoe_pipeline(
    cfg: LimoePipelineConfig, out: str | os.PathLike[str], start: str | None = None
) -> Path:
    """Run every unfinished stage of the image-text pipeline into ``out``; ``start`` redoes from that stage."""
    if start is not None and start not in STAGES:
        raise UserError(
            f"--from: expected one of {', '.join(STAGES)} (an image-text pipeline), got {start!r}"
        )
    p = _LimoePipeline(cfg, Path(out).absolute())
    p.check()
    run_stages(p, p.out, cfg, start, LIMOE_PLAN, FIRST_STAGE, SCHEDULING_KEYS)
    return p.out


def limoe_cli(args: argparse.Namespace, preset_or_file: str) -> int:
    """``mobile-vmoe pipeline`` with an image-text preset or file (``pipeline._cli`` dispatches)."""
    cfg = load_limoe_pipeline_config(preset_or_file, args.overrides)
    if args.data:
        cfg.data = args.data
    out = Path(args.out or Path("runs") / f"pipeline-{cfg.name}")
    run_limoe_pipeline(cfg, out, args.start)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0
