"""`mobile-vmoe pipeline`: the whole method in one command, resumable stage by stage.

    mobile-vmoe pipeline                                  # built-in demo on generated data (~15 min, 2 cores)
    mobile-vmoe pipeline --preset quick --out runs/quick  # smoke run (< 3 min), no accuracy claim
    mobile-vmoe pipeline --preset imagenet1k_tiny --data /imagenet --out runs/in1k

Stages (each calls the public entry of the stage module; they talk only through files under OUT):

    data          the dataset (built-in ones are generated)         OUT/data/ or the --data directory
    dense         dense ViT baseline                                OUT/dense/         (train)
    confusion     its confusion matrix on the held-out split        OUT/confusion/     (superclasses)
    superclasses  balanced partition of the confusion graph         OUT/superclasses/  (superclasses)
    moe           Mobile V-MoE with the super-class router loss     OUT/moe/           (train)
    eval          top-1/top-5 of both, routing statistics           OUT/eval/          (eval)
    export        .pte (fp32, int8), .mlpackage, .onnx of both      OUT/export/        (export)
    bench         host latency of the runnable artifacts            OUT/bench/         (bench)
    report        report.md / report.html with plots                OUT/report.*       (this module)

A stage is finished when OUT/stages/<stage>.json exists (written last, atomically). Re-running skips finished
stages; an interrupted training stage continues from its newest complete checkpoint; ``--from STAGE`` deletes
that stage's and every later stage's outputs and redoes them. OUT/pipeline.yaml is the resolved config; running
again with a different config is an error unless ``--from`` says what to redo.

Under torchrun the training stages run on every rank (DDP); the other stages run on rank 0 while the other
ranks wait for their markers (OUT must be on a file system every node sees).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import UserError, read_json, write_json_atomic, write_text_atomic
from .config import config_to_dict, dump_yaml, list_presets, load_config, load_structured, model_kwargs

log = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "STAGES", "load_pipeline_config", "run_pipeline"]

STAGES = ("data", "dense", "confusion", "superclasses", "moe", "eval", "export", "bench", "report")
MODELS = ("dense", "moe")


@dataclass
class PipelineConfig:
    name: str = "default"
    train: str = (
        "synthetic"  # training preset (or YAML file) shared by both models: same data, recipe, budget
    )
    data: str = ""  # "": the training preset's data.spec; else an ImageFolder directory or a built-in name
    dense_model: str = "mobile_vit_nano_patch8_32"
    moe_model: str = "mobile_vmoe_nano_patch8_32"  # same width/depth as the dense model: equal active FLOPs
    train_overrides: list[str] = field(default_factory=list)  # key=value for both trainings
    dense_overrides: list[str] = field(default_factory=list)
    moe_overrides: list[str] = field(default_factory=list)
    superclass_algorithm: str = "spectral"  # see mobile_vmoe.superclasses.ALGORITHMS
    formats: list[str] = field(default_factory=lambda: ["pte", "coreml", "onnx"])
    int8: bool = True  # also a PT2E int8 .pte (and its latency)
    num_verify: int = 500  # images each export is checked on (the bar for int8 agreement)
    bench_warmup: int = 10
    bench_iterations: int = 50
    bench_threads: int = 0  # 0: the runtime's default
    seed: int = 0


def load_pipeline_config(preset_or_file: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """A pipeline preset (``list_presets("pipeline")``) or YAML file, then ``key=value`` overrides."""
    return load_structured(PipelineConfig, preset_or_file, overrides, kind="pipeline")


# ---------------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def _marker(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _done(out: Path, stage: str) -> dict[str, Any] | None:
    m = _marker(out, stage)
    return read_json(m, "stage marker") if m.is_file() else None


def _stage_outputs(out: Path, stage: str) -> list[Path]:
    """What ``--from`` deletes for a stage (the data stage keeps a generated dataset: it is keyed by its params)."""
    return {
        "data": [],
        "dense": [out / "dense"],
        "confusion": [out / "confusion"],
        "superclasses": [out / "superclasses"],
        "moe": [out / "moe"],
        "eval": [out / "eval"],
        "export": [out / "export"],
        "bench": [out / "bench"],
        "report": [out / "report.md", out / "report.html", out / "report_files"],
    }[stage]


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        trash = p.with_name(f".{p.name}.trash")  # rename first: a half-deleted dir never looks like output
        shutil.rmtree(trash, ignore_errors=True)
        p.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif p.exists():
        p.unlink()


def _wait_for(marker: Path, what: str) -> None:
    """Ranks > 0 under torchrun wait here while rank 0 runs a single-process stage."""
    t0 = time.monotonic()
    while not marker.is_file():
        if time.monotonic() - t0 > 24 * 3600:
            raise UserError(f"waited 24 h for rank 0 to finish {what} ({marker})")
        time.sleep(2)


# ---------------------------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------------------------


class _Pipeline:
    def __init__(self, cfg: PipelineConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))

    # paths every later stage reads
    def run_dir(self, which: str) -> Path:
        return self.out / which

    @property
    def superclasses_json(self) -> Path:
        return self.out / "superclasses" / "superclasses.json"

    def train_config(self, which: str) -> Any:
        c = self.cfg
        over = [*c.train_overrides, *(c.dense_overrides if which == "dense" else c.moe_overrides)]
        tcfg = load_config(c.train, over)
        tcfg.model = c.dense_model if which == "dense" else c.moe_model
        tcfg.name = f"{c.name}-{which}"
        tcfg.seed = c.seed
        tcfg.out = str(self.run_dir(which))
        if c.data:
            tcfg.data.spec = c.data
        if tcfg.data.spec in ("synthetic", "digits") and tcfg.data.root == "data":
            tcfg.data.root = str(self.out / "data")  # generated data lives with the run
        if which == "moe":
            tcfg.moe.superclasses = str(self.superclasses_json)
        return tcfg

    def check(self) -> None:
        """Everything a later stage would reject, checked before the first stage runs."""
        import timm

        import mobile_vmoe.models  # noqa: F401

        from .superclasses import ALGORITHMS

        c = self.cfg
        for which in MODELS:
            tcfg = self.train_config(which)
            if tcfg.model not in timm.list_models("mobile_v*"):
                raise UserError(
                    f"pipeline config {which}_model: {tcfg.model!r} is not a registered mobile model"
                )
            if not tcfg.data.spec:
                raise UserError("pipeline config data: no dataset (set data=DIR or use --data)")
        dense = timm.create_model(c.dense_model, **model_kwargs(self.train_config("dense")))
        moe = timm.create_model(c.moe_model, **model_kwargs(self.train_config("moe")))
        if getattr(dense, "is_moe", False) or not getattr(moe, "is_moe", False):
            raise UserError(
                "pipeline config: dense_model must be a mobile_vit_* and moe_model a mobile_vmoe_* model"
            )
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
    def data(self) -> dict[str, Any]:
        from .data import prepare_dataset, scan_dataset

        t = self.train_config("dense")
        kw = dict(t.data.dataset_kwargs)
        seed = int(kw.pop("seed", 0))
        d = prepare_dataset(t.data.spec, root=t.data.root, seed=seed, **kw).absolute()
        index = scan_dataset(
            d
        )  # fails here, not in an hour, on an empty class or a val class missing from train
        return {
            "data_dir": str(d),
            "num_classes": len(index.class_names),
            "train": len(index.train),
            "val": len(index.val),
        }

    def _train(self, which: str) -> dict[str, Any]:
        from .train import find_checkpoint, train

        tcfg = self.train_config(which)
        tcfg.resume = find_checkpoint(tcfg.out) is not None  # an interrupted run continues
        if tcfg.resume and self.rank == 0:
            log.info("[%s] continuing the interrupted run in %s", which, tcfg.out)
        run = train(tcfg)
        return {"run": str(run), "model_file": str(run / "model.safetensors")}

    def dense(self) -> dict[str, Any]:
        return self._train("dense")

    def moe(self) -> dict[str, Any]:
        return self._train("moe")

    def confusion(self) -> dict[str, Any]:
        import numpy as np

        from .superclasses import heldout_confusion

        C, names, data_dir = heldout_confusion(self.run_dir("dense"))
        d = self.out / "confusion"
        d.mkdir(parents=True, exist_ok=True)
        from .common import atomic_path

        with atomic_path(d / "confusion.npy", suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, C)
        write_json_atomic(d / "classes.json", {"class_names": names, "data_dir": str(data_dir)})
        return {
            "confusion": str(d / "confusion.npy"),
            "heldout_images": int(C.sum()),
            "accuracy": float(np.trace(C) / max(C.sum(), 1)),
        }

    def superclasses(self) -> dict[str, Any]:
        import timm

        from .superclasses import find_superclasses

        moe = timm.create_model(self.cfg.moe_model, **model_kwargs(self.train_config("moe")))
        classes = read_json(self.out / "confusion" / "classes.json")
        res = find_superclasses(
            self.out / "superclasses",
            moe.num_experts,  # E experts, one per super-class
            confusion=self.out / "confusion" / "confusion.npy",
            class_names=classes["class_names"],
            data_dir=classes["data_dir"],
            algorithm=self.cfg.superclass_algorithm,
            seed=self.cfg.seed,
        )
        return {
            "file": str(self.superclasses_json),
            "within_mass": res.within_mass,
            "ari_vs_truth": res.ari_vs_truth,
        }

    def eval(self) -> dict[str, Any]:
        from .evaluate import evaluate

        out = {}
        for which in MODELS:
            r = evaluate(self.run_dir(which), json_out=self.out / "eval" / f"{which}.json")
            out[which] = {"top1": r["top1"], "top5": r["top5"], "num_images": r["num_images"]}
        return out

    def _artifacts(self) -> list[tuple[str, str, str | None, Path]]:
        """(model, format, quantize, path) of every artifact the export stage makes."""
        ext = {"pte": ".pte", "coreml": ".mlpackage", "onnx": ".onnx"}
        arts = []
        for which in MODELS:
            for fmt in self.cfg.formats:
                arts.append((which, fmt, None, self.out / "export" / f"{which}{ext[fmt]}"))
                if fmt == "pte" and self.cfg.int8:
                    arts.append((which, fmt, "int8", self.out / "export" / f"{which}_int8.pte"))
        return arts

    def export(self) -> dict[str, Any]:
        from .export import VerificationError, export_model

        done: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for which, fmt, quant, path in self._artifacts():
            if path.exists() and Path(f"{path}.json").is_file():
                done[path.name] = str(path)  # finished before an interruption
                continue
            log.info("[export] %s -> %s", which, path.name)
            try:
                export_model(
                    fmt,
                    path,
                    checkpoint=self.run_dir(which) / "model.safetensors",
                    quantize=quant,
                    num_verify=self.cfg.num_verify,
                    seed=self.cfg.seed,
                )
                done[path.name] = str(path)
            except VerificationError as e:
                # int8 agreement on a small model trained for minutes can miss the bar: reported, not fatal
                if quant is None:
                    raise
                failed[path.name] = str(e)
                log.warning("[export] %s failed verification, left out: %s", path.name, e)
        return {"artifacts": done, "failed_verification": failed}

    def bench(self) -> dict[str, Any]:
        from .bench import bench

        exported = _done(self.out, "export") or {}
        images = self._bench_images()
        results = {}
        for _which, fmt, _quant, path in self._artifacts():
            if fmt == "coreml" or path.name not in exported.get("artifacts", {}):
                continue  # Core ML predicts only on Apple hardware: ios_bench/
            log.info("[bench] %s", path.name)
            res = self.out / "bench" / f"{path.name}.json"
            bench(
                path,
                warmup=self.cfg.bench_warmup,
                iterations=self.cfg.bench_iterations,
                threads=self.cfg.bench_threads or None,
                images=images,
                json_out=res,
            )
            results[path.name] = str(res)
        return {"results": results}

    def _bench_images(self) -> Path:
        """One validation image per class (sorted files would feed the benchmark a single class / expert)."""
        from .data import scan_dataset

        data_dir = Path(read_json(_marker(self.out, "data"))["data_dir"])
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

    def report(self) -> dict[str, Any]:
        from .report import write_report

        paths = write_report(self.out)
        return {k: str(v) for k, v in paths.items()}

    # ---- driver ------------------------------------------------------------------------------------------
    def run(self, start: str | None) -> None:
        out = self.out
        if self.rank == 0:
            self._check_config(start)
        for stage in STAGES:
            if self.rank != 0 and STAGES.index(stage) > STAGES.index("moe"):
                return  # eval, export, bench and report are rank 0's
            marker = _marker(out, stage)
            if marker.is_file():
                if self.rank == 0:
                    log.info("[%s] done before, skipped (%s)", stage, marker)
                continue
            on_all_ranks = stage in MODELS or stage == "data"
            if self.rank != 0 and not on_all_ranks:
                _wait_for(marker, f"stage {stage}")
                continue
            if self.rank == 0:
                log.info("[%s] ...", stage)
            t0 = time.perf_counter()
            result = getattr(self, stage)()
            if self.rank == 0:
                result = {"stage": stage, "seconds": round(time.perf_counter() - t0, 2), **result}
                write_json_atomic(marker, result)
                log.info("[%s] done in %.1f s", stage, result["seconds"])
            elif on_all_ranks:
                _wait_for(marker, f"stage {stage}")

    def _check_config(self, start: str | None) -> None:
        out = self.out
        saved = out / "pipeline.yaml"
        text = dump_yaml(self.cfg)
        if start is not None:
            for stage in STAGES[STAGES.index(start) :]:
                for p in _stage_outputs(out, stage):
                    _remove(p)
                _marker(out, stage).unlink(missing_ok=True)
        elif saved.is_file() and saved.read_text() != text:
            import yaml

            old = yaml.safe_load(saved.read_text()) or {}
            new = config_to_dict(self.cfg)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(
                f"{saved}: this run was made with another config (differs in {', '.join(diff)}); pass "
                f"--from STAGE to redo from a stage with the new config, or use another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, text)


def run_pipeline(cfg: PipelineConfig, out: str | os.PathLike[str], start: str | None = None) -> Path:
    """Run every unfinished stage of the pipeline into ``out``; ``start`` redoes from that stage. Returns out."""
    if start is not None and start not in STAGES:
        raise UserError(f"--from: expected one of {', '.join(STAGES)}, got {start!r}")
    p = _Pipeline(cfg, Path(out).absolute())
    p.check()
    p.run(start)
    return p.out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.config and args.preset:
        raise UserError("pass either --config FILE or --preset NAME, not both")
    cfg = load_pipeline_config(args.config or args.preset or "default", args.overrides)
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
        help="the whole method: data, dense, super-classes, MoE, eval, export, bench, report",
        description="Run (or resume) every stage into --out. With no arguments: the built-in demo.",
    )
    p.add_argument("--config", default=None, help="pipeline YAML file")
    p.add_argument("--preset", default=None, help=f"pipeline preset ({', '.join(list_presets('pipeline'))})")
    p.add_argument("--data", default=None, help="ImageFolder dataset directory (e.g. ImageNet-1k)")
    p.add_argument("--out", default=None, help="output directory (default runs/pipeline-<preset>)")
    p.add_argument("--from", dest="start", choices=STAGES, default=None, help="redo from this stage on")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides")
    p.set_defaults(func=_cli)
