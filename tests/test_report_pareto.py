"""The report's accuracy vs latency section, from small hand-made stage files written through their owner modules:
a real host bench result of a tiny checkpoint with chosen samples, sidecars, a capacity curve and stage markers."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import timm

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.bench import bench
from mobile_vmoe.bench.schema import write_result
from mobile_vmoe.checkpoint import ModelMeta, save_model
from mobile_vmoe.common import UserError
from mobile_vmoe.config import dump_yaml
from mobile_vmoe.files.capacity_curve import CapacityCurve, CurvePoint, write_capacity_curve
from mobile_vmoe.files.sidecar import Sidecar, write_sidecar
from mobile_vmoe.files.stage_marker import StageMarker, write_marker
from mobile_vmoe.pipeline import load_pipeline_config, run_pipeline
from mobile_vmoe.pipeline_dir import (
    BenchSummary,
    EvalSummary,
    ExportSummary,
    capacity_export_name,
    changed_keys,
    read_summary,
)
from mobile_vmoe.preprocess import Preprocess
from mobile_vmoe.report_pareto import pareto_front, pareto_section

# name -> (p50 ms, top-1): vmoe.pte is beaten by moe.pte, vmoe_c0.25 by dense.pte; the rest make the front
POINTS = {
    "dense.pte": (1.0, 0.70),
    "moe.pte": (1.5, 0.80),
    "vmoe.pte": (2.0, 0.78),
    "vmoe_c0.5.pte": (1.2, 0.72),
    "vmoe_c0.25.pte": (1.1, 0.60),
}
BPR = {1.0: 0.79, 0.5: 0.72, 0.25: 0.60, 0.1: 0.30}  # the curve's top-1; vanilla is lower everywhere


@pytest.fixture(scope="module")
def host_doc(tmp_path_factory):
    """One real host bench result of a tiny eager checkpoint (its samples are replaced per artifact)."""
    d = tmp_path_factory.mktemp("ckpt")
    m = timm.create_model("mobile_vit_nano_patch4_32", num_classes=2, img_size=16, depth=1)
    meta = ModelMeta("mobile_vit_nano_patch4_32", {"num_classes": 2, "img_size": 16, "depth": 1}, ["a", "b"],
                     Preprocess.for_model(m))  # fmt: skip
    return bench(save_model(d / "m.safetensors", m, meta), warmup=0, iterations=3, isolate=False)


def _stage_files(out, host_doc) -> None:
    curve = CapacityCurve("mobile_vmoe_token_nano_patch4_32", "vmoe/model.safetensors", 1, "val")
    for pr, shift in (("bpr", 0.0), ("vanilla", -0.1)):
        curve.points += [CurvePoint(pr, r, t + shift, t + shift, [0.0]) for r, t in BPR.items()]
    curve_file = write_capacity_curve(out / "eval" / "vmoe_capacity.json", curve)
    artifacts, results = {}, {}
    for name, (p50, _) in POINTS.items():
        art = out / "export" / name
        art.parent.mkdir(parents=True, exist_ok=True)
        art.write_bytes(name.encode())
        ratio = 1.05 if name == "vmoe.pte" else float(name[6:-4]) if name.startswith("vmoe_c") else None
        routing = None if ratio is None else {"E": 4, "K": 1, "L": 1, "kind": "token", "capacity_ratio": ratio,
                                              "priority": "bpr"}  # fmt: skip
        write_sidecar(art, Sidecar("pte", name, "m", {}, ["a", "b"], [1, 3, 16, 16], Preprocess(16, 16), "fp32",
                                   routing=routing))  # fmt: skip
        doc = {**host_doc, "samples_ms": [p50] * 3, "timed_iterations": 3}
        results[name] = str(write_result(out / "bench" / f"{name}.json", doc))
        artifacts[name] = str(art)
    top1 = {w: POINTS[f"{w}.pte"][1] for w in ("dense", "moe", "vmoe")}
    summaries = {
        "eval": EvalSummary(top1, top1, {w: 10 for w in top1}, {"vmoe": str(curve_file)}),
        "export": ExportSummary(artifacts, {}),
        "bench": BenchSummary(results),
    }
    for stage, s in summaries.items():
        write_marker(out, StageMarker(stage, 1.0, [], asdict(s)))


def test_pareto_section_plots_tables_and_marks_the_front(tmp_path, host_doc):
    out = tmp_path / "run"
    _stage_files(out, host_doc)
    stages = {s: read_summary(out, s) for s in ("eval", "export", "bench")}
    md = pareto_section(out, out / "report_files", stages)

    assert md[0] == "## Accuracy vs latency"
    png = out / "report_files" / "pareto.png"
    assert (
        png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and "![accuracy vs latency](report_files/pareto.png)" in md
    )
    rows = [line for line in md if line.startswith("| ") and "`export/" in line]
    assert (
        rows
        == [
            "| dense |  | `export/dense.pte` | 1.000 | 70.00 % | yes |",
            "| per-image MoE |  | `export/moe.pte` | 1.500 | 80.00 % | yes |",
            "| per-token V-MoE | 1.05 (bpr) | `export/vmoe.pte` | 2.000 | 78.00 % |  |",  # its own routing: eval's top-1
            "| per-token V-MoE | 0.5 (bpr) | `export/vmoe_c0.5.pte` | 1.200 | 72.00 % | yes |",  # the curve's bpr
            "| per-token V-MoE | 0.25 (bpr) | `export/vmoe_c0.25.pte` | 1.100 | 60.00 % |  |",
        ]
    )

    # no bench stage: no section
    assert pareto_section(out, out / "report_files", {**stages, "bench": None}) == []


def test_pareto_front_keeps_ties_and_drops_dominated_points():
    assert pareto_front([(1.0, 0.5), (1.0, 0.5), (2.0, 0.9), (2.0, 0.8), (3.0, 0.9)]) == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert pareto_front([]) == []
    assert capacity_export_name("vmoe", 0.5) == "vmoe_c0.5.pte"
    assert capacity_export_name("vmoe", 1.0) == "vmoe_c1.pte"


def test_pareto_capacity_ratios_config(tmp_path):
    cfg = load_pipeline_config("threeway_digits")
    assert cfg.pareto_capacity_ratios == [0.5, 0.25]
    # a ratio the eval curve does not measure is refused before any stage runs
    bad = load_pipeline_config(
        "quick", ["vmoe_model=mobile_vmoe_token_nano_patch4_32", "pareto_capacity_ratios=[0.3]"]
    )
    with pytest.raises(UserError, match=r"pareto_capacity_ratios: \[0.3\] need a point on the eval curve"):
        run_pipeline(bad, tmp_path / "bad")
    assert not (tmp_path / "bad" / "stages").exists()
    # a run directory made before the option existed reads it as its default (no export redo asked for)
    old = load_pipeline_config("quick")
    text = "\n".join(
        line for line in dump_yaml(old).splitlines() if not line.startswith("pareto_capacity_ratios")
    )
    (tmp_path / "pipeline.yaml").write_text(text + "\n")
    assert changed_keys(tmp_path, old) == []
    assert changed_keys(tmp_path, load_pipeline_config("quick", ["pareto_capacity_ratios=[0.5]"])) == [
        "pareto_capacity_ratios"
    ]
