"""`mobile-vmoe pipeline`: the whole method in one command, resumable stage by stage.

    mobile-vmoe pipeline                                  # built-in demo on generated data (~15 min, 2 cores)
    mobile-vmoe pipeline --preset quick --out runs/quick  # smoke run (< 3 min), no accuracy claim
    mobile-vmoe pipeline --preset imagenet1k_tiny --data /imagenet --out runs/in1k
    mobile-vmoe pipeline --preset limoe                   # LIMoE and its baselines: mobile_vmoe.pipeline_limoe

Stages (each calls the public entry of the stage module; they talk only through files under OUT):

    data          the dataset (built-in ones are generated)         OUT/data/ or the --data directory
    dense         dense ViT baseline                                OUT/dense/         (train)
    confusion     its confusion matrix on the held-out split        OUT/confusion/     (confusion)
    superclasses  balanced partition of the confusion graph         OUT/superclasses/  (superclasses)
    moe           Mobile V-MoE with the super-class router loss     OUT/moe/           (train)
    vmoe          per-token V-MoE (only with vmoe_model set)        OUT/vmoe/          (train)
    eval          top-1/top-5 of each, routing statistics,          OUT/eval/          (eval)
                  a V-MoE's accuracy vs capacity curve
    export        .pte (fp32, int8), .mlpackage, .onnx of each;     OUT/export/        (export)
                  the per-token model's .pte at each of
                  pareto_capacity_ratios (vmoe_c<ratio>.pte)
    bench         host latency of the runnable artifacts            OUT/bench/         (bench)
    report        report.md / report.html with plots                OUT/report.*       (report)

A stage is finished when its marker OUT/stages/<stage>.json (files.stage_marker, written last) exists and every
output it vouches for is still there; otherwise it is redone, and every later stage with it (their outputs
listed in their markers are deleted first). An interrupted training stage continues from its newest complete
checkpoint. ``--from STAGE`` redoes STAGE and the later stages, after checking that OUT is a pipeline directory
and that the earlier stages' markers and outputs are there. OUT/pipeline.yaml is the resolved config; a re-run
with a different config must redo (``--from``) at least from the first stage the change affects.

OUT is locked (flock on OUT/.lock) while a run writes it. Under torchrun the training stages run on every rank
(DDP); the other stages run on rank 0, which alone takes the lock, while the other ranks wait for the markers
(OUT must be on a file system every node sees).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .common import UserError, existing_path
from .config import list_presets, model_kwargs
from .files.stage_marker import marker_path
from .pipeline_config import (
    FIRST_STAGE,
    SCHEDULING_KEYS,
    Artifact,
    PipelineConfig,
    export_artifacts,
    load_pipeline_config,
    train_config,
)
from .pipeline_dir import (
    CLASSIFIER,
    STAGES,
    BenchSummary,
    ConfusionSummary,
    DataSummary,
    EvalSummary,
    ExportSummary,
    ReportSummary,
    StageDone,
    SuperclassSummary,
    TrainSummary,
    read_summary,
    run_stages,
)
from .pipeline_limoe import STAGES as LIMOE_STAGES
from .pipeline_limoe import is_image_text_pipeline, limoe_cli

log = logging.getLogger(__name__)

__all__ = [
    "FIRST_STAGE", "PipelineConfig", "STAGES", "load_pipeline_config", "run_pipeline", "train_config",
]  # fmt: skip

MODELS = ("dense", "moe", "vmoe")  # vmoe only when the config names a per-token model


# ---------------------------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------------------------


def _check_pareto_ratios(c: Any, vmoe: Any) -> None:
    """Each exported capacity has a top-1 on the eval curve (1 image per group, as the .pte runs) and a buffer
    of its own: two ratios with one P at batch 1 would export the same model twice."""
    missing = [r for r in c.pareto_capacity_ratios if r not in c.capacity_ratios]
    if missing or (c.pareto_capacity_ratios and 1 not in c.capacity_group_sizes):
        raise UserError(
            f"pipeline config pareto_capacity_ratios: {missing or c.pareto_capacity_ratios} need a point on the "
            f"eval curve: among capacity_ratios {c.capacity_ratios}, with 1 in capacity_group_sizes"
        )
    own = vmoe.moe_mlps()[0].eval_capacity_ratio  # vmoe.pte is exported at the model's own ratio
    slots = {vmoe.expert_capacity(own, 1): f"{own:g} (vmoe.pte)"}
    for r in c.pareto_capacity_ratios:
        P = vmoe.expert_capacity(r, 1)
        if P in slots:
            raise UserError(
                f"pipeline config pareto_capacity_ratios: {r:g} gives the same buffer as {slots[P]} at batch 1 "
                f"(P={P} slots per expert for {c.vmoe_model}'s tokens): the same .pte twice; pick ratios with "
                "distinct buffers"
            )
        slots[P] = f"{r:g}"


class _Pipeline:
    def __init__(self, cfg: PipelineConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.rank = int(os.environ.get("RANK", "0"))

    def run_dir(self, which: str) -> Path:
        return self.out / which

    def models(self) -> list[str]:
        return [w for w in MODELS if w != "vmoe" or self.cfg.vmoe_model]

    def train_config(self, which: str) -> Any:
        return train_config(self.cfg, self.out, which)

    def num_experts(self) -> int:
        import timm

        import mobile_vmoe.models  # noqa: F401  (registers the model names)

        return timm.create_model(self.cfg.moe_model, **model_kwargs(self.train_config("moe"))).num_experts

    def summary(self, stage: str) -> Any:
        s = read_summary(self.out, stage)
        if s is None:
            raise UserError(f"stage {stage} has not finished ({marker_path(self.out, stage)})")
        return s

    def check(self) -> None:
        """Everything a later stage would reject, checked before the first stage runs."""
        import timm

        from .capacity import EVAL_BATCH_SIZE
        from .data import BUILTIN
        from .models.names import classifier_models
        from .superclasses import ALGORITHMS

        c = self.cfg
        for which in self.models():
            tcfg = self.train_config(which)
            if tcfg.model not in classifier_models():
                raise UserError(
                    f"pipeline config {which}_model: {tcfg.model!r} is not a registered mobile model"
                )
            if not tcfg.data.spec:
                raise UserError("pipeline config data: no dataset (set data=DIR or use --data)")
        spec = self.train_config("dense").data.spec
        if spec not in BUILTIN and not Path(spec).is_dir():
            raise UserError(f"--data {spec}: not a directory (nor a built-in dataset: {', '.join(BUILTIN)})")
        dense = timm.create_model(c.dense_model, **model_kwargs(self.train_config("dense")))
        moe = timm.create_model(c.moe_model, **model_kwargs(self.train_config("moe")))
        if getattr(dense, "is_moe", False) or not getattr(moe, "is_moe", False):
            raise UserError(
                "pipeline config: dense_model must be a mobile_vit_* and moe_model a mobile_vmoe_* model"
            )
        if c.vmoe_model:
            vmoe = timm.create_model(c.vmoe_model, **model_kwargs(self.train_config("vmoe")))
            if getattr(vmoe, "moe_routing", None) != "token":
                raise UserError("pipeline config vmoe_model: expected a per-token mobile_vmoe_token_* model")
            if not c.capacity_ratios or any(not r > 0 for r in c.capacity_ratios):
                raise UserError(
                    f"pipeline config capacity_ratios: expected values > 0, got {c.capacity_ratios}"
                )
            if not c.capacity_group_sizes or any(
                g < 1 or EVAL_BATCH_SIZE % g for g in c.capacity_group_sizes
            ):
                raise UserError(
                    f"pipeline config capacity_group_sizes: expected divisors of the eval batch of "
                    f"{EVAL_BATCH_SIZE} images (mobile_vmoe.capacity.EVAL_BATCH_SIZE), got {c.capacity_group_sizes}"
                )
            if "pte" in c.formats:
                _check_pareto_ratios(c, vmoe)
        if c.superclass_algorithm not in ALGORITHMS:
            raise UserError(f"pipeline config superclass_algorithm: expected one of {', '.join(ALGORITHMS)}")
        bad = sorted(set(c.formats) - {"pte", "coreml", "onnx"})
        if bad:
            raise UserError(f"pipeline config formats: unknown {bad}; expected a list of pte, coreml, onnx")
        if c.num_verify < 1 or c.bench_iterations < 1 or c.bench_warmup < 0:
            raise UserError(
                "pipeline config: num_verify and bench_iterations must be >= 1, bench_warmup >= 0"
            )

    # ---- stages ------------------------------------------------------------------------------------------
    def data(self) -> StageDone:
        from .data import BUILTIN, prepare_dataset, scan_dataset

        t = self.train_config("dense")
        kw = dict(t.data.dataset_kwargs)
        seed = int(kw.pop("seed", 0))
        d = prepare_dataset(t.data.spec, root=t.data.root, seed=seed, **kw).absolute()
        index = scan_dataset(
            d
        )  # fails here, not in an hour, on an empty class or a val class missing from train
        E = self.num_experts()
        if len(index.class_names) < E:
            raise UserError(
                f"{d}: {len(index.class_names)} classes, fewer than the MoE's {E} experts (one super-class each); "
                f"use a dataset with more classes or moe_overrides=[moe_kwargs.num_experts=N]"
            )
        generated = t.data.spec in BUILTIN and d.is_relative_to(self.out)
        outputs = [d] if generated else []  # a user's dataset is not ours to vouch for
        return StageDone(
            outputs, DataSummary(str(d), len(index.class_names), len(index.train), len(index.val))
        )

    def _train(self, which: str) -> StageDone:
        from .checkpoint import MODEL_FILE, read_meta
        from .train import find_checkpoint, train

        tcfg = self.train_config(which)
        tcfg.resume = find_checkpoint(tcfg.out) is not None  # an interrupted run continues
        if tcfg.resume and self.rank == 0:
            log.info("[%s] continuing the interrupted run in %s", which, tcfg.out)
        run = train(tcfg)
        model_file = run / MODEL_FILE
        outputs = [run, model_file, run / "config.yaml"]
        heldout = read_meta(model_file).train.heldout_list if self.rank == 0 else None
        if heldout and Path(heldout).is_relative_to(self.out):
            outputs.append(Path(heldout))  # what the confusion stage reads
        return StageDone(outputs, TrainSummary(str(run), str(model_file)))

    def dense(self) -> StageDone:
        return self._train("dense")

    def moe(self) -> StageDone:
        return self._train("moe")

    def vmoe(self) -> StageDone:
        return self._train("vmoe") if self.cfg.vmoe_model else StageDone([], TrainSummary("", ""))

    def confusion(self) -> StageDone:
        from .confusion import heldout_confusion, write_confusion

        conf = heldout_confusion(self.run_dir("dense"))
        d = self.out / "confusion"
        files = write_confusion(d, conf)
        return StageDone([d, *files], ConfusionSummary(conf.num_images, conf.accuracy, conf.empty_classes))

    def superclasses(self) -> StageDone:
        from .confusion import read_confusion
        from .files.superclass_map import SUPERCLASSES_JSON
        from .superclasses import find_superclasses

        conf = read_confusion(self.out / "confusion")
        d = self.out / "superclasses"
        res = find_superclasses(
            d,
            self.num_experts(),  # E experts, one per super-class
            confusion=conf.counts,
            class_names=conf.class_names,
            data_dir=conf.data_dir,
            algorithm=self.cfg.superclass_algorithm,
            seed=self.cfg.seed,
        )
        json_file = d / SUPERCLASSES_JSON
        outputs = [d, json_file, d / "superclasses.md", d / "superclasses.png"]
        return StageDone(
            outputs, SuperclassSummary(str(json_file), res.within_mass, res.ari_vs_truth, res.warnings)
        )

    def eval(self) -> StageDone:
        from .capacity import capacity_curve
        from .evaluate import evaluate

        s = EvalSummary({}, {}, {}, {})
        outputs = [self.out / "eval"]
        for which in self.models():
            outputs.append(self.out / "eval" / f"{which}.json")
            r = evaluate(self.run_dir(which), json_out=outputs[-1])
            s.top1[which], s.top5[which], s.num_images[which] = r["top1"], r["top5"], r["num_images"]
            log.info("[eval] %s: top-1 %.2f %%", which, 100 * r["top1"])
            if r.get("routing") == "token":
                curve = self.out / "eval" / f"{which}_capacity.json"
                capacity_curve(self.run_dir(which), list(self.cfg.capacity_ratios), json_out=curve,
                               group_sizes=list(self.cfg.capacity_group_sizes))  # fmt: skip
                outputs += [curve, curve.with_suffix(".png")]
                s.capacity_curves[which] = str(curve)
        return StageDone(outputs, s)

    def _artifacts(self) -> list[Artifact]:
        return export_artifacts(self.cfg, self.out, self.models())

    def export(self) -> StageDone:
        from .export.parallel import ExportJob, export_many
        from .files.sidecar import exported_from, sidecar_path

        s = ExportSummary({}, {})
        (self.out / "export").mkdir(parents=True, exist_ok=True)  # also with formats=[]: its marker lists it
        jobs = []
        digests: dict[Path, str] = {}  # each model file hashed once for all its artifacts
        for which, fmt, quant, path, capacity in self._artifacts():
            ckpt = str(self.run_dir(which) / "model.safetensors")
            if exported_from(path, ckpt, digests):
                s.artifacts[path.name] = str(path)  # finished before an interruption, from this model
                continue
            kw = dict(
                checkpoint=ckpt, quantize=quant, capacity_ratio=capacity, num_verify=self.cfg.num_verify
            )
            kw.update(seed=self.cfg.seed, verbose=False)
            jobs.append(ExportJob(fmt, str(path), kw))
        for i, (job, error) in enumerate(export_many(jobs, self.cfg.export_workers), start=1):
            name = Path(job.out).name
            log.info("[export] %d/%d %s", i, len(jobs), name)
            if error is None:
                s.artifacts[name] = job.out
            elif job.kwargs["quantize"] is None:
                raise error
            else:  # int8 agreement on a small model trained for minutes can miss the bar: reported, not fatal
                s.failed_verification[name] = str(error)
                log.warning("[export] %s failed verification, left out: %s", name, error)
        done = [Path(p) for p in s.artifacts.values()]
        return StageDone([self.out / "export", *done, *map(sidecar_path, done)], s)

    def bench(self) -> StageDone:
        from .bench import bench

        exported = self.summary("export").artifacts
        images = self._bench_images()
        s = BenchSummary({})
        todo = [a.path for a in self._artifacts() if a.format != "coreml" and a.path.name in exported]
        for i, path in enumerate(todo, start=1):  # Core ML predicts only on Apple hardware: ios_bench/
            log.info("[bench] %d/%d %s", i, len(todo), path.name)
            res = self.out / "bench" / f"{path.name}.json"
            bench(
                path,
                warmup=self.cfg.bench_warmup,
                iterations=self.cfg.bench_iterations,
                threads=self.cfg.bench_threads or None,
                images=images,
                json_out=res,
            )
            s.results[path.name] = str(res)
        return StageDone([self.out / "bench", images, *map(Path, s.results.values())], s)

    def _bench_images(self) -> Path:
        """One validation image per class (sorted files would feed the benchmark a single class / expert)."""
        from .data import scan_dataset

        data_dir = existing_path(
            self.summary("data").data_dir, marker_path(self.out, "data"), "result.data_dir"
        )
        d = self.out / "bench" / "images"
        if d.is_dir():
            return d
        index = scan_dataset(data_dir)
        first: dict[int, str] = {}
        for s in index.val or index.train:
            first.setdefault(s.target, s.path)
        tmp = d.with_name(".images.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for target, rel in sorted(first.items()):
            shutil.copyfile(data_dir / rel, tmp / f"{target:05d}{Path(rel).suffix}")
        tmp.rename(d)
        return d

    def report(self) -> StageDone:
        from .report import write_report
        from .report_common import FILES

        paths = write_report(self.out)
        md, html = paths["markdown"], paths["html"]
        return StageDone([md, html, self.out / FILES], ReportSummary(str(md), str(html)))


def run_pipeline(cfg: PipelineConfig, out: str | os.PathLike[str], start: str | None = None) -> Path:
    """Run every unfinished stage of the pipeline into ``out``; ``start`` redoes from that stage. Returns out."""
    if start is not None and start not in STAGES:
        raise UserError(f"--from: expected one of {', '.join(STAGES)}, got {start!r}")
    p = _Pipeline(cfg, Path(out).absolute())
    p.check()
    run_stages(p, p.out, cfg, start, CLASSIFIER, FIRST_STAGE, SCHEDULING_KEYS)
    return p.out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    if args.config and args.preset:
        raise UserError("pass either --config FILE or --preset NAME, not both")
    source = args.config or args.preset or "default"
    if is_image_text_pipeline(source):  # kind: image_text (LIMoE and its baselines)
        return limoe_cli(args, source)
    cfg = load_pipeline_config(source, args.overrides)
    if args.data:
        cfg.data = args.data
    out = Path(args.out or Path("runs") / f"pipeline-{cfg.name}")
    run_pipeline(cfg, out, args.start)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="the whole method: data, dense, super-classes, MoE, eval, export, bench, report (or, with an "
        "image-text preset such as limoe: LIMoE and its baselines)",
        description="Run (or resume) every stage into --out. With no arguments: the built-in demo.",
    )
    p.add_argument("--config", default=None, help="pipeline YAML file")
    p.add_argument("--preset", default=None, help=f"pipeline preset ({', '.join(list_presets('pipeline'))})")
    p.add_argument(
        "--data",
        default=None,
        help="ImageFolder dataset directory (e.g. ImageNet-1k); a caption set "
        "(.csv/.tsv, .tar shards or a folder of them) for an image-text preset",
    )
    p.add_argument("--out", default=None, help="output directory (default runs/pipeline-<preset>)")
    stages = list(dict.fromkeys([*STAGES, *LIMOE_STAGES]))
    p.add_argument("--from", dest="start", choices=stages, default=None, help="redo from this stage on")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides")
    p.set_defaults(func=_cli)
