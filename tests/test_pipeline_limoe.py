"""The image-text pipeline (``mobile-vmoe pipeline --preset limoe_quick``): every stage end to end (four models
trained, evaluated zero-shot, exported, benchmarked, reported), a re-run that does nothing, ``--from``, and bad
config refused before any stage runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import hold_lock, image_folder
from safetensors.torch import load_file

from mobile_vmoe import pipeline_dir
from mobile_vmoe.bench import validate_result
from mobile_vmoe.common import PIPELINE_YAML, UserError
from mobile_vmoe.config import dump_yaml
from mobile_vmoe.files.image_text_eval import read_image_text_eval
from mobile_vmoe.files.sidecar import read_sidecar
from mobile_vmoe.files.stage_marker import StageMarker, write_marker
from mobile_vmoe.pipeline import load_pipeline_config
from mobile_vmoe.pipeline_dir import not_done, read_summary
from mobile_vmoe.pipeline_limoe import (
    FIRST_STAGE,
    LIMOE_PLAN,
    MODELS,
    STAGES,
    LimoePipelineConfig,
    is_image_text_pipeline,
    load_limoe_pipeline_config,
    run_limoe_pipeline,
)

MODEL_NAMES = {"limoe": "mobile_limoe_nano_patch8_32", "limoe_no_entropy": "mobile_limoe_nano_patch8_32",
               "onetower": "mobile_onetower_nano_patch8_32", "clip": "mobile_clip_nano_patch8_32"}  # fmt: skip


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mobile_vmoe.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_limoe_quick_pipeline_end_to_end(tmp_path, caplog):
    out = tmp_path / "lq"
    done = _cli("pipeline", "--preset", "limoe_quick", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in done.stdout
    for stage in STAGES:
        assert (out / "stages" / f"{stage}.json").is_file(), stage

    data = read_summary(out, "data", LIMOE_PLAN)
    assert (data.num_classes, data.train, data.val) == (8, 128, 24)  # 8 classes x 8 images x 2 captions
    for which in MODELS:
        ev = read_image_text_eval(out / "eval" / f"{which}.json")
        assert ev.model == MODEL_NAMES[which] and ev.zero_shot is not None and ev.zero_shot.num_classes == 8
        assert 0 <= ev.zero_shot.top1 <= ev.zero_shot.top5 <= 1 and ev.retrieval.num_captions == 24
        assert (ev.routing is not None) == which.startswith("limoe")
        for fmt in ("pte", "onnx"):
            name = f"{which}.{fmt}"
            sc = read_sidecar(out / "export" / f"{name}.json")
            assert sc.kind == "zero_shot_classifier" and len(sc.class_names) == 8
            assert (
                sc.checkpoint.startswith(str(out / which)) and sc.details["parity"]["top1_agreement"] == 1.0
            )
            doc = json.loads((out / "bench" / f"{name}.json").read_text())
            validate_result(doc, name)
            assert len(doc["samples_ms"]) == 3
        assert not (out / "export" / f"{which}.mlpackage").exists()  # limoe_quick: no Core ML
    text = read_sidecar(out / "export" / "limoe_text.pte.json")
    assert text.kind == "text_encoder" and text.input_shape == [1, 16]
    validate_result(json.loads((out / "bench" / "limoe_text.pte.json").read_text()), "limoe_text.pte")
    # the two LIMoE runs differ in their entropy losses only
    cfgs = {w: (out / w / "config.yaml").read_text() for w in ("limoe", "limoe_no_entropy")}
    assert "entropy_losses: true" in cfgs["limoe"] and "entropy_losses: false" in cfgs["limoe_no_entropy"]

    md = (out / "report.md").read_text()
    for section in ("Results on generated data", "## Caption set", "## Models", "zero-shot top-1",
                    "MFLOPs / pair", "## Routing", "success image", "## What the data favours",
                    "## Host latency", "## Artifacts", "LIMoE, no entropy losses",
                    "dense two-tower (CLIP)"):  # fmt: skip
        assert section in md, section
    assert (out / "report_files" / "limoe_routing.png").stat().st_size > 1000
    assert "report_files/limoe_routing.png" in md and "<table>" in (out / "report.html").read_text()

    # a re-run does nothing: every stage is done
    caplog.set_level(logging.INFO)
    mtime = (out / "limoe" / "model.safetensors").stat().st_mtime_ns
    cfg = load_limoe_pipeline_config("limoe_quick", ["export_workers=1"])  # scheduling only: no redo
    run_limoe_pipeline(cfg, out)
    assert all(f"[{s}] done before, skipped" in caplog.text for s in STAGES)
    assert (out / "limoe" / "model.safetensors").stat().st_mtime_ns == mtime

    # a changed bench setting is refused without --from; --from report redoes the report alone
    changed = load_limoe_pipeline_config("limoe_quick", ["bench_iterations=2"])
    with pytest.raises(UserError, match=r"differs in bench_iterations\); pass --from bench"):
        run_limoe_pipeline(changed, out)
    report_mtime, bench_mtime = ((out / f).stat().st_mtime_ns for f in ("report.md", "bench/clip.onnx.json"))
    caplog.clear()
    run_limoe_pipeline(cfg, out, "report")
    assert "[bench] done before, skipped" in caplog.text and "[report] done in" in caplog.text
    assert (out / "report.md").stat().st_mtime_ns != report_mtime
    assert (out / "bench" / "clip.onnx.json").stat().st_mtime_ns == bench_mtime
    assert (out / "limoe" / "model.safetensors").stat().st_mtime_ns == mtime


def test_presets_dispatch_and_first_stages():
    assert is_image_text_pipeline("limoe") and is_image_text_pipeline("limoe_quick")
    assert not is_image_text_pipeline("quick") and not is_image_text_pipeline("default")
    assert set(FIRST_STAGE) | {"export_workers"} == {f.name for f in dataclasses.fields(LimoePipelineConfig)}
    assert set(FIRST_STAGE.values()) <= set(STAGES)
    assert load_limoe_pipeline_config("limoe").formats == ["pte", "coreml", "onnx"]
    # the classifier loader refuses an image-text preset's keys (the dispatch reads ``kind`` first)
    with pytest.raises(UserError, match="kind"):
        load_pipeline_config("limoe")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["limoe_model=mobile_limoe_huge"],
            "limoe_model: 'mobile_limoe_huge' is not a registered image-text",
        ),
        (["onetower_model=mobile_vit_nano_patch8_32"], "an image-text pipeline trains no classifier"),
        (["clip_model=mobile_onetower_nano_patch8_32"], "clip_model: .* is not a dense two-tower"),
        (["limoe_model=mobile_clip_nano_patch8_32"], "limoe_model: .* is not a LIMoE"),
        (["formats=[pte,tflite]"], r"formats: unknown \['tflite'\]"),
        (["num_verify=0"], "num_verify"),
        (["data=/no/such/captions.csv"], "--data /no/such/captions.csv: no such caption source"),
        (["train_overrides=[schedule.epochz=1]"], "epochz"),
        (["train_overrides=[image_text.eval_batch_size=0]"], "image_text.eval_batch_size must be >= 1"),
    ],
)
def test_bad_config_fails_before_any_stage(tmp_path, overrides, match):
    cfg = load_limoe_pipeline_config("limoe_quick", overrides)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        run_limoe_pipeline(cfg, out)
    assert not out.exists()  # nothing was created, let alone trained


def test_cli_refuses_a_classifier_stage_and_a_bad_start(tmp_path):
    with pytest.raises(UserError, match="expected one of data, limoe, .* got 'superclasses'"):
        run_limoe_pipeline(load_limoe_pipeline_config("limoe_quick"), tmp_path / "o", "superclasses")
    with pytest.raises(UserError, match="not a pipeline directory"):
        run_limoe_pipeline(load_limoe_pipeline_config("limoe_quick"), tmp_path / "o", "eval")
    done = _cli(
        "pipeline",
        "--preset",
        "limoe_quick",
        "--out",
        tmp_path / "o2",
        "onetower_model=mobile_vit_nano_patch8_32",
    )
    assert done.returncode == 2 and "trains no classifier" in done.stderr and not (tmp_path / "o2").exists()


def test_a_classifier_dataset_is_refused_before_any_stage(tmp_path):
    photos = image_folder(tmp_path / "photos", train={"ant": 2, "bee": 2}, val={"ant": 1, "bee": 1})
    cfg = load_limoe_pipeline_config("limoe_quick", [f"data={photos}"])
    with pytest.raises(UserError, match=f"--data {photos}: not a caption set.*not an image-classification"):
        run_limoe_pipeline(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Under torchrun: trainings on every rank (DDP), every other stage on rank 0 alone
# ---------------------------------------------------------------------------------------------------------------

# limoe_quick shrunk: 6 classes of 16 px images (4 tokens), batch 32 (16 per rank), no export (formats=[])
TINY_DDP = """
kind: image_text
train: limoe_synthetic
train_overrides:
  - "data.dataset_kwargs={num_superclasses: 3, num_fine: 2, train_per_class: 8, val_per_class: 4, image_size: 16}"
  - data.image_size=16
  - model_kwargs.depth=2
  - model_kwargs.context_length=16
  - batch_size=32
  - schedule.epochs=1
  - schedule.warmup_epochs=0
  - threads=1
  - dump_replicas=true
formats: []
text_encoder: false
eval_batch_size: 64
bench_warmup: 0
bench_iterations: 1
"""

# Each rank runs the CLI in process and records every path it opened for writing or renamed onto (Python's audit
# events): what rank 1 wrote, seen from inside, not guessed from the files left behind.
RANK_SCRIPT = """
import json, os, sys
writes = []
def watch(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        if (mode is not None and set(mode) & set("wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
            writes.append(os.path.abspath(os.fsdecode(path)))
    elif event == "os.rename":
        writes.append(os.path.abspath(os.fsdecode(args[1])))
sys.addaudithook(watch)
from mobile_vmoe.cli import main
rc = main(["pipeline", "--config", sys.argv[1], "--out", sys.argv[2], *sys.argv[4:]])
with open(os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"rc": rc, "writes": writes}, f)
sys.exit(rc)  # a failed rank fails the job: torchrun then stops the other ranks
"""


def _torchrun_pipeline(script: Path, cfg: Path, out: Path, log: Path, *args: str) -> list[dict]:
    """``torchrun --nproc-per-node 2 ... pipeline``; what each rank wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(cfg), str(out), str(log), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((log / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    return ranks


def test_torchrun_trains_on_every_rank_and_leaves_the_other_stages_to_rank_0(tmp_path):
    cfg, script, out, log = tmp_path / "tiny.yaml", tmp_path / "rank.py", tmp_path / "out", tmp_path / "log"
    cfg.write_text(TINY_DDP)
    script.write_text(RANK_SCRIPT)
    log.mkdir()
    ranks = _torchrun_pipeline(script, cfg, out, log)

    for stage in STAGES:
        assert (out / "stages" / f"{stage}.json").is_file(), stage
    assert (out / "export").is_dir() and read_summary(out, "export", LIMOE_PLAN).artifacts == {}
    assert read_summary(out, "data", LIMOE_PLAN).train == 96  # 6 classes x 8 images x 2 captions
    for which in MODELS:
        run = out / which
        assert (run / "config.yaml").is_file() and read_image_text_eval(out / "eval" / f"{which}.json")
        # DDP: rank 1's replica ends as rank 0's model file, after 96 / 32 = 3 steps of 16 pairs per rank
        r0, r1 = load_file(run / "model.safetensors"), load_file(run / "replica_rank1.safetensors")
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), which
        epochs = [
            r
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "epoch"
        ]
        assert epochs[-1]["step"] == 3
    assert (out / "report.md").is_file()

    def written(rank: int) -> set[str]:
        """The top-level entries of OUT that rank ``rank`` wrote into."""
        return {Path(w).relative_to(out).parts[0] for w in ranks[rank]["writes"] if w.startswith(f"{out}/")}

    # rank 1: its share of the data and of the trainings (its replicas), nothing else: no lock, no pipeline.yaml,
    # no marker, nothing of eval, export, bench or report
    assert set(MODELS) <= written(1) <= {"data", *MODELS}
    assert {".lock", "pipeline.yaml", "stages", "eval", "report.md"} <= written(0)

    # --from clip: both ranks redo clip (rank 1 reads the markers once rank 0 has deleted those of clip and later:
    # an old clip marker taken for done would leave rank 0 alone in clip's process group)
    mtimes = {w: (out / w / "model.safetensors").stat().st_mtime_ns for w in MODELS}
    _torchrun_pipeline(script, cfg, out, log, "--from", "clip")
    assert [w for w in MODELS if (out / w / "model.safetensors").stat().st_mtime_ns != mtimes[w]] == ["clip"]
    r0, r1 = (
        load_file(out / "clip" / "model.safetensors"),
        load_file(out / "clip" / "replica_rank1.safetensors"),
    )
    assert all(torch.equal(r0[k], r1[k]) for k in r0) and not_done(out, "report", LIMOE_PLAN) is None


def _all_done(out: Path) -> None:
    """A pipeline directory whose every stage is done: pipeline.yaml and one marker per stage (no outputs)."""
    out.mkdir()
    (out / PIPELINE_YAML).write_text(dump_yaml(load_limoe_pipeline_config("limoe_quick")))
    for stage in STAGES:
        fields = dataclasses.fields(LIMOE_PLAN.summaries[stage])  # a marker holds its summary's fields
        write_marker(out, StageMarker(stage, 0.0, [], {f.name: None for f in fields}))


def test_ranks_above_0_take_no_lock_and_leave_the_stages_after_the_trainings_to_rank_0(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _all_done(out)
    cfg = load_limoe_pipeline_config("limoe_quick")
    monkeypatch.setattr(pipeline_dir, "RANK0_WAIT_S", 0)  # a rank > 0 waiting for a marker fails at once
    holder = hold_lock(out)
    try:
        with pytest.raises(
            UserError, match=rf"another pipeline run is writing this directory \(pid {holder.pid} "
        ):
            run_limoe_pipeline(cfg, out)
        monkeypatch.setenv("RANK", "1")  # a torchrun rank > 0 follows the markers; every stage is done
        assert run_limoe_pipeline(cfg, out) == out
        for stage in (
            "eval",
            "export",
            "bench",
            "report",
        ):  # rank 0's alone: a rank > 0 does not wait for them
            (out / "stages" / f"{stage}.json").unlink()
        assert run_limoe_pipeline(cfg, out) == out
    finally:
        holder.kill()
        holder.wait()
