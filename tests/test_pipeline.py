"""The pipeline verb end to end on the quick preset: every stage, the report, skipping finished stages,
continuing an interrupted training, ``--from``, and config errors before any stage runs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from mobile_vmoe.bench import validate_result
from mobile_vmoe.common import UserError
from mobile_vmoe.config import list_presets
from mobile_vmoe.files.sidecar import read_sidecar
from mobile_vmoe.pipeline import STAGES, load_pipeline_config, run_pipeline


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, caplog):
    out = tmp_path / "quick"
    cmd = [sys.executable, "-m", "mobile_vmoe.cli", "pipeline", "--preset", "quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in done.stdout

    markers = {s: json.loads((out / "stages" / f"{s}.json").read_text()) for s in STAGES}
    assert markers["superclasses"]["ari_vs_truth"] is not None
    for which in ("dense", "moe"):
        assert (out / which / "model.safetensors").is_file()
        ev = json.loads((out / "eval" / f"{which}.json").read_text())
        assert ev["num_images"] == 36 and 0 <= ev["top1"] <= 1
        for name in (f"{which}.pte", f"{which}.onnx", f"{which}.mlpackage"):
            sc = read_sidecar(out / "export" / f"{name}.json")
            assert (out / "export" / name).exists() and sc.checkpoint.startswith(str(out / which))
        for name in (f"{which}.pte", f"{which}.onnx"):
            validate_result(json.loads((out / "bench" / f"{name}.json").read_text()), name)
    sc = json.loads((out / "superclasses" / "superclasses.json").read_text())
    moe_cfg = (out / "moe" / "config.yaml").read_text()
    assert str(out / "superclasses" / "superclasses.json") in moe_cfg and len(sc["assignment"]) == 9

    md = (out / "report.md").read_text()
    for section in ("Results on generated data", "## Dataset", "## Models", "## Accuracy", "## Super-classes",
                    "adjusted Rand index", "## Routing", "## Host latency", "## Artifacts"):  # fmt: skip
        assert section in md, section
    for png in ("dataset", "accuracy", "routing", "latency"):
        assert f"report_files/{png}.png" in md and (out / "report_files" / f"{png}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "<table>" in html and "report_files/routing.png" in html

    # a second run skips every finished stage
    cfg = load_pipeline_config("quick")
    caplog.set_level(logging.INFO)
    mtime = (out / "dense" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(cfg, out)
    assert all(f"[{s}] done before, skipped" in caplog.text for s in STAGES)
    assert (out / "dense" / "model.safetensors").stat().st_mtime_ns == mtime

    # an interrupted MoE training continues from its checkpoint; later stages were never marked
    for s in STAGES[STAGES.index("moe") :]:
        (out / "stages" / f"{s}.json").unlink()
    (out / "moe" / "model.safetensors").unlink()
    caplog.clear()
    run_pipeline(cfg, out, None)
    assert (
        "[moe] continuing the interrupted run" in caplog.text
        and (out / "moe" / "model.safetensors").is_file()
    )
    assert "[dense] done before, skipped" in caplog.text

    # --from redoes that stage and the later ones, with a changed config
    report_mtime = (out / "report.md").stat().st_mtime_ns
    changed = load_pipeline_config("quick", ["bench_iterations=3"])
    with pytest.raises(UserError, match="differs in bench_iterations"):
        run_pipeline(changed, out)
    run_pipeline(changed, out, "bench")
    assert json.loads((out / "bench" / "dense.pte.json").read_text())["stats"]["count"] == 3
    assert (out / "report.md").stat().st_mtime_ns != report_mtime
    assert (out / "dense" / "model.safetensors").stat().st_mtime_ns == mtime


def test_bad_pipeline_config_fails_before_any_stage(tmp_path):
    def fails(match: str, *overrides: str) -> None:
        with pytest.raises(UserError, match=match):
            run_pipeline(load_pipeline_config("quick", list(overrides)), tmp_path / "bad")
        assert not (tmp_path / "bad" / "stages").exists()

    fails("formats: unknown", "formats=[pte, tflite]")
    fails("dense_model must be a mobile_vit_", "dense_model=mobile_vmoe_nano_patch4_32")
    fails("not a registered mobile model", "moe_model=resnet18")
    fails("superclass_algorithm", "superclass_algorithm=kmeans")
    fails("num_verify", "num_verify=0")
    with pytest.raises(UserError, match="unknown config key 'epochs'"):
        load_pipeline_config("quick", ["epochs=3"])
    with pytest.raises(UserError, match="--from: expected one of"):
        run_pipeline(load_pipeline_config("quick"), tmp_path / "bad", "training")
    assert {"default", "quick", "imagenet1k_tiny"} <= set(list_presets("pipeline"))
