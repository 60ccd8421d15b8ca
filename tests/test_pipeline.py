"""The pipeline verb: every stage end to end (built-in data, and a user's ImageFolder with the quick preset),
the report, skipping finished stages, redoing stages whose outputs are gone, continuing an interrupted training,
``--from`` (validated before anything is deleted), the lock, and config errors before any stage runs."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from fixtures import hold_lock, image_folder
from safetensors.torch import load_file

from mobile_vmoe.bench import validate_result
from mobile_vmoe.bench.schema import ingest_result
from mobile_vmoe.common import UserError
from mobile_vmoe.config import dump_yaml, list_presets
from mobile_vmoe.files.capacity_curve import read_capacity_curve
from mobile_vmoe.files.sidecar import read_sidecar
from mobile_vmoe.files.stage_marker import StageMarker, read_marker, write_marker
from mobile_vmoe.files.superclass_map import read_superclass_map
from mobile_vmoe.pipeline import FIRST_STAGE, STAGES, PipelineConfig, load_pipeline_config, run_pipeline
from mobile_vmoe.pipeline_config import SCHEDULING_KEYS
from mobile_vmoe.pipeline_dir import read_summary


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mobile_vmoe.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# The three-way comparison: a per-token V-MoE beside the two models, its .pte also at capacity 0.25
THREEWAY = ["vmoe_model=mobile_vmoe_token_nano_patch4_32", "capacity_ratios=[1.0,0.25]",
            "pareto_capacity_ratios=[0.25]"]  # fmt: skip


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, caplog):
    out = tmp_path / "quick"
    done = _cli("pipeline", "--preset", "quick", "--out", out, *THREEWAY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in done.stdout

    assert read_summary(out, "superclasses").ari_vs_truth is not None
    for which in ("dense", "moe"):
        assert (out / which / "model.safetensors").is_file()
        ev = json.loads((out / "eval" / f"{which}.json").read_text())
        assert ev["num_images"] == 36 and 0 <= ev["top1"] <= 1
        for name in (f"{which}.pte", f"{which}.onnx", f"{which}.mlpackage"):
            sc = read_sidecar(out / "export" / f"{name}.json")
            assert (out / "export" / name).exists() and sc.checkpoint.startswith(str(out / which))
        for name in (f"{which}.pte", f"{which}.onnx"):
            validate_result(json.loads((out / "bench" / f"{name}.json").read_text()), name)
    sc = read_superclass_map(out / "superclasses" / "superclasses.json")
    moe_cfg = (out / "moe" / "config.yaml").read_text()
    assert str(out / "superclasses" / "superclasses.json") in moe_cfg and len(sc.assignment) == 9

    md = (out / "report.md").read_text()
    for section in ("Results on generated data", "## Dataset", "## Models", "## Accuracy", "## Super-classes",
                    "adjusted Rand index", "## Routing", "## Host latency", "## Artifacts"):  # fmt: skip
        assert section in md, section
    for png in ("dataset", "accuracy", "routing", "latency"):
        assert f"report_files/{png}.png" in md and (out / "report_files" / f"{png}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "<table>" in html and "report_files/routing.png" in html
    _check_threeway(out, md)

    # a second run skips every finished stage, also with another worker count (it changes no output)
    cfg = load_pipeline_config("quick", [*THREEWAY, "export_workers=1"])
    caplog.set_level(logging.INFO)
    mtime = (out / "dense" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(cfg, out)
    assert all(f"[{s}] done before, skipped" in caplog.text for s in STAGES)
    assert (out / "dense" / "model.safetensors").stat().st_mtime_ns == mtime


def _check_threeway(out, report: str) -> None:
    """Three trainings on the same data, the per-token model's capacity curve, the three .pte (the per-token one
    also at capacity 0.25) benched, and the report's accuracy vs latency plot."""
    ev = read_summary(out, "eval")
    assert set(ev.top1) == {"dense", "moe", "vmoe"} and "vmoe" in ev.capacity_curves
    routing = read_sidecar(out / "export" / "vmoe_c0.25.pte.json").routing
    assert routing["capacity_ratio"] == 0.25
    assert read_sidecar(out / "export" / "vmoe.pte.json").routing["capacity_ratio"] == 1.05  # the model's own
    p50 = ingest_result(out / "bench" / "vmoe_c0.25.pte.json")["stats"]["p50"]
    assert "## Per-token routing (V-MoE)" in report and "vmoe − dense top-1" in report
    assert (out / "report_files" / "vmoe_routing.png").is_file()
    assert "## Accuracy vs latency" in report and (out / "report_files" / "pareto.png").is_file()
    top1 = read_capacity_curve(ev.capacity_curves["vmoe"]).top1(routing["priority"], 0.25)
    assert (
        f"| 0.25 ({routing['priority']}) | `export/vmoe_c0.25.pte` | {p50:.3f} | {100 * top1:.2f} % |"
        in report
    )
    assert all(f"`export/{w}.pte`" in report for w in ("dense", "moe", "vmoe"))


# ---------------------------------------------------------------------------------------------------------------
# A user's ImageFolder with the quick preset: one run shared by the tests below, in this order
# ---------------------------------------------------------------------------------------------------------------

USER_OVERRIDES = ["formats=[onnx]", "export_workers=1"]  # one export format: the data handling is tested here


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """``pipeline --preset quick --data DIR``: 4 classes, "dog" with one training image (none can be held out)."""
    root = tmp_path_factory.mktemp("user")
    data = image_folder(
        root / "photos", train={"ant": 8, "bee": 8, "cat": 8, "dog": 1}, val={"ant": 2, "bee": 2, "cat": 2}
    )
    out = root / "out"
    t0 = time.perf_counter()
    done = _cli("pipeline", "--preset", "quick", "--data", data, "--out", out, *USER_OVERRIDES)
    return out, data, done, time.perf_counter() - t0


def _user_cfg(data) -> PipelineConfig:
    cfg = load_pipeline_config("quick", USER_OVERRIDES)
    cfg.data = str(data)
    return cfg


@pytest.mark.slow
def test_quick_preset_on_a_users_imagefolder_is_quiet_and_warns_about_an_empty_class(user_run):
    out, data, done, seconds = user_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_summary(out, "data").data_dir == str(data) and read_summary(out, "data").num_classes == 4
    assert not (out / "data").exists()  # the quick preset's generator options did not apply to user data
    assert read_sidecar(out / "export" / "moe.onnx.json").class_names == ["ant", "bee", "cat", "dog"]
    # quiet: stage lines, no library chatter (e.g. ONNX's "Replaced initializer ..." lines)
    err = done.stderr
    assert "[dense] done in" in err and "[report] done in" in err
    assert "Replaced initializer" not in err and "Traceback" not in err
    assert len(err.splitlines()) < 80, err[-3000:]
    # "dog" has no held-out image: it still gets a super-class, and every output says so
    sc = read_superclass_map(out / "superclasses" / "superclasses.json")
    assert len(sc.assignment) == 4 and sorted(sc.sizes) == [1, 1, 2]
    dog = [w for w in sc.warnings if w.endswith("so their super-class rests on little or no evidence: dog")]
    assert len(dog) == 1 and dog[0].startswith("1 class(es) had no held-out images")
    assert read_summary(out, "confusion").empty_classes == ["dog"]
    assert dog[0] in (out / "superclasses" / "superclasses.md").read_text()
    assert f"**Warning:** {dog[0]}" in (out / "report.md").read_text()
    assert dog[0] in err
    assert seconds < 600


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_while_ranks_above_0_take_no_lock(user_run, monkeypatch):
    out, data, done, _ = user_run
    assert done.returncode == 0
    holder = hold_lock(out)
    try:
        with pytest.raises(
            UserError, match=rf"another pipeline run is writing this directory \(pid {holder.pid} "
        ):
            run_pipeline(_user_cfg(data), out)
        monkeypatch.setenv("RANK", "1")  # a torchrun rank > 0 follows the markers; every stage is done
        run_pipeline(_user_cfg(data), out)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_from_checks_the_earlier_stages_and_the_config_before_deleting_anything(user_run):
    out, data, done, _ = user_run
    assert done.returncode == 0
    cfg = _user_cfg(data)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    sc_json = out / "superclasses" / "superclasses.json"
    kept = sc_json.read_bytes()
    sc_json.unlink()
    with pytest.raises(UserError, match=r"--from moe: needs stage superclasses, but its output "
                                        r"superclasses/superclasses.json is gone"):  # fmt: skip
        run_pipeline(cfg, out, "moe")
    sc_json.write_bytes(kept)

    moe_changed = _user_cfg(data)
    moe_changed.moe_overrides = ["optim.lr=1e-3"]
    with pytest.raises(UserError, match=r"differs in moe_overrides\); pass --from superclasses"):
        run_pipeline(moe_changed, out, "eval")

    report_marker = read_marker(out, "report")
    (out / "stages" / "report.json").unlink()  # report.md is there, but no marker vouches for it
    with pytest.raises(UserError, match=r"report\.md holds an unfinished stage report \(no marker\)"):
        run_pipeline(cfg, out, "bench")
    write_marker(out, report_marker)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing was deleted


@pytest.mark.slow
def test_a_stage_whose_output_is_gone_is_redone_with_every_later_stage(user_run, caplog):
    out, data, done, _ = user_run
    assert done.returncode == 0
    (out / "notes.txt").write_text("mine")  # not the pipeline's: never deleted
    dense_mtime = (out / "dense" / "model.safetensors").stat().st_mtime_ns
    moe_mtime = (out / "moe" / "model.safetensors").stat().st_mtime_ns
    (out / "superclasses" / "superclasses.json").unlink()
    caplog.set_level(logging.INFO)
    run_pipeline(_user_cfg(data), out)
    assert (
        "[superclasses] done before, but its output superclasses/superclasses.json is gone: redoing it and "
        "every later stage" in caplog.text
    )
    assert "[confusion] done before, skipped" in caplog.text and "[moe] continuing" not in caplog.text
    assert read_superclass_map(out / "superclasses" / "superclasses.json").class_names[-1] == "dog"
    assert (out / "dense" / "model.safetensors").stat().st_mtime_ns == dense_mtime
    assert (out / "moe" / "model.safetensors").stat().st_mtime_ns != moe_mtime  # trained against the new map
    assert all(
        read_marker(out, s) is not None and not read_marker(out, s).missing_outputs(out) for s in STAGES
    )
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_an_interrupted_training_continues_and_a_changed_bench_setting_needs_from(user_run, caplog):
    """On the user run (2 artifacts to bench, where the built-in run has 4): what the end-to-end test leaves out."""
    out, data, done, _ = user_run
    assert done.returncode == 0
    mtime = (out / "dense" / "model.safetensors").stat().st_mtime_ns
    # an interrupted MoE training continues from its checkpoint; later stages were never marked
    for s in STAGES[STAGES.index("moe") :]:
        (out / "stages" / f"{s}.json").unlink()
    (out / "moe" / "model.safetensors").unlink()
    caplog.set_level(logging.INFO)
    run_pipeline(_user_cfg(data), out, None)
    assert (
        "[moe] continuing the interrupted run" in caplog.text
        and (out / "moe" / "model.safetensors").is_file()
    )
    assert "[dense] done before, skipped" in caplog.text

    # --from redoes that stage and the later ones, with a changed config
    report_mtime = (out / "report.md").stat().st_mtime_ns
    changed = _user_cfg(data)
    changed.bench_iterations = 3
    with pytest.raises(UserError, match=r"differs in bench_iterations\); pass --from bench"):
        run_pipeline(changed, out)
    run_pipeline(changed, out, "bench")
    assert json.loads((out / "bench" / "dense.onnx.json").read_text())["stats"]["count"] == 3
    assert (out / "report.md").stat().st_mtime_ns != report_mtime
    assert (out / "dense" / "model.safetensors").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------------------------
# Fast: bad input refused before any stage runs, and before anything is deleted
# ---------------------------------------------------------------------------------------------------------------


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
    fails("--data .*nowhere: not a directory", f"data={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="unknown config key 'epochs'"):
        load_pipeline_config("quick", ["epochs=3"])
    with pytest.raises(UserError, match="--from: expected one of"):
        run_pipeline(load_pipeline_config("quick"), tmp_path / "bad", "training")
    assert {"default", "quick", "imagenet1k_tiny"} <= set(list_presets("pipeline"))
    assert set(FIRST_STAGE) | SCHEDULING_KEYS == {f.name for f in dataclasses.fields(PipelineConfig)}
    assert set(FIRST_STAGE.values()) <= set(STAGES)


def _user_files(root):
    for rel in ("dense/precious.txt", "moe/notes.md", "report.md", "export/mine.onnx"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_from_outside_a_pipeline_directory_deletes_nothing(tmp_path):
    cfg = load_pipeline_config("quick")
    mine = tmp_path / "mine"
    before = _user_files(mine)
    for start in ("dense", "report"):
        with pytest.raises(
            UserError, match=r"--from .*: .*mine is not a pipeline directory \(no pipeline.yaml\)"
        ):
            run_pipeline(cfg, mine, start)
    with pytest.raises(UserError, match="not empty and not a pipeline directory"):
        run_pipeline(cfg, mine)
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    r = _cli("pipeline", "--preset", "quick", "--out", mine, "--from", "dense", timeout=300)
    assert r.returncode == 2 and "is not a pipeline directory" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(UserError, match="not a pipeline directory"):
        run_pipeline(cfg, tmp_path / "nowhere", "dense")
    assert not (tmp_path / "nowhere").exists()


def test_from_with_missing_inputs_deletes_nothing(tmp_path):
    cfg = load_pipeline_config("quick")
    out = tmp_path / "out"
    before = _user_files(out)
    (out / "pipeline.yaml").write_text(dump_yaml(cfg))
    before = sorted([*before, (out / "pipeline.yaml").relative_to(out)])
    with pytest.raises(UserError, match=r"--from moe: needs stage data, but no marker"):
        run_pipeline(cfg, out, "moe")
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock") == before


def test_a_marker_cannot_send_a_redo_outside_the_pipeline_directory(tmp_path):
    cfg = load_pipeline_config("quick")
    victim = tmp_path / "victim.txt"
    victim.write_text("not the pipeline's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "pipeline.yaml").write_text(dump_yaml(cfg))
    write_marker(out, StageMarker("data", 1.0, ["../victim.txt"], {}))
    with pytest.raises(UserError, match=r"data\.json: output '\.\./victim\.txt' is not a path inside"):
        run_pipeline(cfg, out, "dense")
    with pytest.raises(UserError, match="is not a path inside"):
        run_pipeline(cfg, out)
    assert victim.read_text() == "not the pipeline's"


def test_torchrun_trains_back_to_back_on_every_rank_and_leaves_the_other_stages_to_rank_0(tmp_path):
    """Two gloo processes through the three-way pipeline without exports: moe and vmoe train one right after the
    other, each in a process group of its own (their rendezvous must not read the previous group's keys)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "mobile_vmoe.cli", "pipeline", "--preset", "quick", "--out", str(out), "formats=[]", THREEWAY[0],
           "train_overrides=[dump_replicas=true]"]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(read_marker(out, s) is not None for s in STAGES) and (out / "report.md").is_file()
    assert done.stdout.count("report: ") == 1  # rank 0 alone
    for which in ("dense", "moe", "vmoe"):
        r0, r1 = (
            load_file(out / which / "model.safetensors"),
            load_file(out / which / "replica_rank1.safetensors"),
        )
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), which


def test_a_second_run_is_refused_while_the_directory_is_locked(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        t0 = time.perf_counter()
        r = _cli("pipeline", "--preset", "quick", "--out", out, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"another pipeline run is writing this directory (pid {holder.pid} on" in r.stderr
        assert time.perf_counter() - t0 < 120 and not (out / "stages").exists()
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(out)


def test_quiet_by_default_and_verbose_with_v(capsys):
    from mobile_vmoe.cli import main

    names = ("", "mobile_vmoe", "torch", "py.warnings")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for argv, ours, libraries in (
            (["-v", "models", "mobile_vit_nano_patch8_32"], logging.DEBUG, logging.INFO),
            (["models", "-v", "mobile_vit_nano_patch8_32"], logging.DEBUG, logging.INFO),
            (["models", "mobile_vit_nano_patch8_32"], logging.INFO, logging.ERROR),
        ):
            assert main(argv) == 0 and "mobile_vit_nano_patch8_32" in capsys.readouterr().out
            assert logging.getLogger("mobile_vmoe.pipeline").getEffectiveLevel() == ours
            assert logging.getLogger("onnx_ir").getEffectiveLevel() == libraries  # "Replaced initializer ..."
            assert logging.getLogger("torch").level == max(libraries, logging.WARNING)
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        logging.captureWarnings(False)


def test_progress_is_plain_log_lines_without_a_terminal(caplog, monkeypatch):
    import mobile_vmoe.cli as cli

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(cli, "PROGRESS_LOG_SECONDS", 0.0)  # every item, instead of every 30 s
    monkeypatch.setattr(cli.sys, "stderr", io.StringIO())  # a log file, not a terminal
    assert list(cli.progress(iter("abc"), 3, "held-out confusion")) == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records] == [f"held-out confusion: {i}/3" for i in (1, 2, 3)]
