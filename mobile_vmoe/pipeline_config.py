"""The pipeline's config (``mobile-vmoe pipeline --preset NAME key=value ...``) and what it derives: each model's
training config and the list of artifacts the export stage makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .config import load_config, load_structured
from .pipeline_dir import capacity_export_name

__all__ = [
    "FIRST_STAGE",
    "SCHEDULING_KEYS",
    "Artifact",
    "PipelineConfig",
    "export_artifacts",
    "load_pipeline_config",
    "train_config",
]


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
    # A per-token V-MoE trained beside them on the same data and budget (no super-classes); "" leaves it out.
    vmoe_model: str = ""
    vmoe_overrides: list[str] = field(default_factory=list)
    capacity_ratios: list[float] = field(
        default_factory=lambda: [2.0, 1.0, 0.5, 0.25, 0.1]
    )  # V-MoE eval sweep
    # images routed together in that sweep, one curve each: 1 is what a phone runs at batch 1 (and what the
    # Pareto plot uses); V-MoE evaluates groups of 8, where small ratios still leave distinct buffers
    capacity_group_sizes: list[int] = field(default_factory=lambda: [1])
    # The per-token model's .pte also exported (and benched) at these inference capacity ratios, each one of
    # capacity_ratios (the eval curve gives its top-1): the report's accuracy vs latency plot. Applies only with
    # vmoe_model set and pte in formats (a run without exports, e.g. formats=[], ignores it).
    pareto_capacity_ratios: list[float] = field(default_factory=list)
    superclass_algorithm: str = "spectral"  # see mobile_vmoe.superclasses.ALGORITHMS
    formats: list[str] = field(default_factory=lambda: ["pte", "coreml", "onnx"])
    int8: bool = True  # also a PT2E int8 .pte (and its latency)
    num_verify: int = 500  # images each export is checked on (the bar for int8 agreement)
    export_workers: int = 2  # artifacts lowered side by side: lowering is mostly single-threaded Python
    bench_warmup: int = 10
    bench_iterations: int = 50
    bench_threads: int = 0  # 0: the runtime's default
    seed: int = 0


# The first stage each config key changes: a run with a changed key must redo from there (or earlier).
# moe_model / moe_overrides fix E, the number of super-classes.
FIRST_STAGE = {
    "name": "dense", "train": "data", "data": "data", "dense_model": "dense", "moe_model": "superclasses",
    "train_overrides": "data", "dense_overrides": "dense", "moe_overrides": "superclasses",
    "superclass_algorithm": "superclasses", "vmoe_model": "vmoe", "vmoe_overrides": "vmoe",
    "capacity_ratios": "eval", "capacity_group_sizes": "eval", "pareto_capacity_ratios": "export", "formats": "export", "int8": "export",
    "num_verify": "export", "bench_warmup": "bench", "bench_iterations": "bench", "bench_threads": "bench",
    "seed": "dense",
}  # fmt: skip
SCHEDULING_KEYS = {"export_workers"}  # change how a stage runs, not what it writes: never force a redo


def load_pipeline_config(preset_or_file: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """A pipeline preset (``list_presets("pipeline")``) or YAML file, then ``key=value`` overrides."""
    return load_structured(PipelineConfig, preset_or_file, overrides, kind="pipeline")


def train_config(cfg: PipelineConfig, out: Path, which: str) -> Any:
    """The training config of the ``which`` ("dense" | "moe" | "vmoe") model of a pipeline writing to ``out``."""
    own = {"dense": cfg.dense_overrides, "moe": cfg.moe_overrides, "vmoe": cfg.vmoe_overrides}[which]
    tcfg = load_config(cfg.train, [*cfg.train_overrides, *own])
    tcfg.model = {"dense": cfg.dense_model, "moe": cfg.moe_model, "vmoe": cfg.vmoe_model}[which]
    tcfg.name = f"{cfg.name}-{which}"
    tcfg.seed = cfg.seed
    tcfg.out = str(out / which)
    if cfg.data and cfg.data != tcfg.data.spec:
        tcfg.data.dataset_kwargs = {}  # the preset's generator options are for its own dataset, not this one
        tcfg.data.spec = cfg.data
    if tcfg.data.spec in ("synthetic", "digits") and tcfg.data.root == "data":
        tcfg.data.root = str(out / "data")  # generated data lives with the run
    if which == "moe":
        tcfg.moe.superclasses = str(out / "superclasses" / "superclasses.json")
    return tcfg


class Artifact(NamedTuple):
    """One file the export stage makes (and the bench stage times, Core ML aside)."""

    model: str  # dense | moe | vmoe
    format: str  # pte | coreml | onnx
    quantize: str | None  # None (fp32) | "int8"
    path: Path
    capacity_ratio: float | None = None  # per-token model: inference capacity of the export (None: its own)


def export_artifacts(cfg: PipelineConfig, out: Path, models: list[str]) -> list[Artifact]:
    """Every artifact of the export stage, in export order: each model in each format (+ int8 .pte), then the
    per-token model's .pte at each of ``pareto_capacity_ratios``."""
    ext = {"pte": ".pte", "coreml": ".mlpackage", "onnx": ".onnx"}
    arts = []
    for which in models:
        for fmt in cfg.formats:
            arts.append(Artifact(which, fmt, None, out / "export" / f"{which}{ext[fmt]}"))
            if fmt == "pte" and cfg.int8:
                arts.append(Artifact(which, fmt, "int8", out / "export" / f"{which}_int8.pte"))
    if "vmoe" in models and "pte" in cfg.formats:
        for r in cfg.pareto_capacity_ratios:
            arts.append(Artifact("vmoe", "pte", None, out / "export" / capacity_export_name("vmoe", r), r))
    return arts
