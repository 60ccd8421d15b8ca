"""Moved or copied pipeline and run directories: a finished pipeline moved to a new name resumes with nothing
redone, its checkpoints evaluate, its exports and bench results still point at its own files; files written
with absolute paths (older versions) still load; data left behind outside a moved directory is named clearly."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mobile_vmoe.bench.schema import RESULT_PATHS
from mobile_vmoe.checkpoint import read_meta
from mobile_vmoe.common import UserError, load_path, load_paths, store_path, store_paths
from mobile_vmoe.evaluate import evaluate
from mobile_vmoe.files.capacity_curve import read_capacity_curve
from mobile_vmoe.files.file_list import read_file_list
from mobile_vmoe.files.sidecar import Sidecar, read_sidecar, sidecar_path, write_sidecar
from mobile_vmoe.files.stage_marker import StageMarker, marker_path, read_marker, write_marker
from mobile_vmoe.pipeline import STAGES, load_pipeline_config, run_pipeline, train_config
from mobile_vmoe.pipeline_dir import read_summary
from mobile_vmoe.report import write_report
from mobile_vmoe.train_run import check_run_dir

# the quick preset with a per-token V-MoE (eval writes its capacity curve) and no exports (lowering and timing
# them takes most of a minute; sidecars and bench results are tested on their own below): ~15 s on 2 cores
OVERRIDES = ["formats=[]", "vmoe_model=mobile_vmoe_token_nano_patch4_32", "capacity_ratios=[1.0]"]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A finished pipeline made in OLD, then moved to NEW: (old, new, the stage markers' bytes before the move)."""
    root = tmp_path_factory.mktemp("relocate")
    old, new = root / "runs" / "a", root / "moved" / "b"
    run_pipeline(load_pipeline_config("quick", OVERRIDES), old)
    markers = {s: marker_path(old, s).read_bytes() for s in STAGES}
    new.parent.mkdir()
    shutil.move(old, new)
    return old, new, markers


def test_store_path_is_relative_inside_the_moving_directory_and_absolute_outside(tmp_path):
    run = tmp_path / "out" / "dense"
    assert store_path(tmp_path / "out" / "data" / "x", run, tmp_path / "out") == "../data/x"
    assert store_path(tmp_path / "elsewhere" / "x", run, tmp_path / "out") == str(
        tmp_path / "elsewhere" / "x"
    )
    assert load_path("../data/x", run) == tmp_path / "out" / "data" / "x"
    assert load_path(str(tmp_path / "abs"), run) == tmp_path / "abs"  # files of older versions


def test_a_moved_pipeline_resumes_with_nothing_redone(moved, caplog, monkeypatch):
    old, new, markers = moved
    caplog.set_level(logging.INFO)
    assert run_pipeline(load_pipeline_config("quick", OVERRIDES), new) == new
    assert all(f"[{s}] done before, skipped" in caplog.text for s in STAGES), caplog.text
    assert {s: marker_path(new, s).read_bytes() for s in STAGES} == markers  # no stage wrote its marker again
    assert (new / "report.md").is_file()
    # what the stages recorded points into the new place
    assert read_summary(new, "data").data_dir.startswith(str(new / "data"))
    assert read_summary(new, "moe").model_file == str(new / "moe" / "model.safetensors")
    assert read_summary(new, "eval").capacity_curves["vmoe"] == str(new / "eval" / "vmoe_capacity.json")
    for f in [*new.glob("stages/*.json"), *new.glob("eval/*.json"), new / "confusion" / "classes.json"]:
        assert str(old) not in f.read_text(), f
    for which in ("dense", "moe", "vmoe"):
        with safe_open(str(new / which / "model.safetensors"), framework="pt") as f:
            assert str(old) not in f.metadata()["train"]
    # the report of the moved directory, given as a path relative to the working directory
    monkeypatch.chdir(new.parent)
    assert write_report(new.name)["markdown"].read_text().count("## Per-token routing (V-MoE)") == 1


def test_a_moved_checkpoint_evaluates_and_its_exports_point_at_it(moved):
    _, new, _ = moved
    meta = read_meta(new / "moe")
    assert meta.train.data_dir.startswith(str(new / "data"))
    assert meta.train.superclasses == str(new / "superclasses" / "superclasses.json")
    r = evaluate(new / "moe", json_out=new / "re_eval.json")
    assert r["num_images"] == 36 and r["data_dir"] == meta.train.data_dir
    assert json.loads((new / "re_eval.json").read_text())["checkpoint"] == "moe/model.safetensors"
    assert evaluate(new / "dense", split="heldout")["num_images"] == 18  # the held-out list, moved with it
    assert read_capacity_curve(new / "eval" / "vmoe_capacity.json").checkpoint == str(
        new / "vmoe" / "model.safetensors"
    )


def test_an_interrupted_training_in_a_moved_pipeline_may_resume(moved):
    """RUN/config.yaml keeps the paths as given (it is also a --config file); a resume rebases them."""
    old, new, _ = moved
    assert str(old / "data") in (new / "moe" / "config.yaml").read_text()
    cfg = train_config(load_pipeline_config("quick", OVERRIDES), new, "moe")
    cfg.resume = True
    data_dir = read_meta(new / "moe").train.data_dir
    heldout = read_file_list(new / "moe" / "heldout.txt", data_dir)
    assert set(check_run_dir(new / "moe", cfg, heldout, data_dir)) <= {"out"}


def test_files_with_absolute_paths_still_load(moved, tmp_path):
    _, new, _ = moved
    # a model file of an older version: absolute paths in its train record
    src = new / "dense" / "model.safetensors"
    with safe_open(str(src), framework="pt") as f:
        md = f.metadata()
    train = json.loads(md["train"])
    absolute = {k: str(load_path(train[k], src.parent)) for k in ("data_dir", "heldout_list")}
    old_file = tmp_path / "elsewhere" / "model.safetensors"
    old_file.parent.mkdir()
    save_file(load_file(str(src)), str(old_file), metadata={**md, "train": json.dumps({**train, **absolute})})
    assert read_meta(old_file).train.data_dir == absolute["data_dir"]
    assert evaluate(old_file, split="heldout")["num_images"] == 18
    # a stage marker and a sidecar with absolute paths
    m = read_marker(new, "data")
    write_marker(tmp_path, StageMarker("data", m.seconds, [], {**m.result, "data_dir": absolute["data_dir"]}))
    assert read_summary(tmp_path, "data").data_dir == absolute["data_dir"]
    sc = _sidecar(src, tmp_path / "dense.onnx")
    write_sidecar(tmp_path / "dense.onnx", sc)
    raw = json.loads(sidecar_path(tmp_path / "dense.onnx").read_text())
    assert raw["checkpoint"] == str(src)  # outside the export's folder: absolute, as older versions wrote it
    assert read_sidecar(sidecar_path(tmp_path / "dense.onnx")).checkpoint == str(src)


def _sidecar(model_file, artifact) -> Sidecar:
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(b"an exported model")
    meta = read_meta(model_file)
    images = {"data_dir": meta.train.data_dir, "heldout_list": meta.train.heldout_list}
    return Sidecar("onnx", artifact.name, meta.model, meta.model_kwargs, meta.class_names, [1, 3, 16, 16],
                   meta.preprocess, "fp32", checkpoint=str(model_file), details={"images": images})  # fmt: skip


def test_a_sidecar_and_a_bench_result_in_a_moved_pipeline_point_at_its_files(moved, tmp_path):
    _, new, _ = moved
    old, moved_to = tmp_path / "a", tmp_path / "b"
    shutil.copytree(new, old)
    write_sidecar(
        old / "export" / "moe.onnx", _sidecar(old / "moe" / "model.safetensors", old / "export" / "moe.onnx")
    )
    raw = json.loads(sidecar_path(old / "export" / "moe.onnx").read_text())
    assert (
        raw["checkpoint"] == "../moe/model.safetensors"
        and raw["images"]["heldout_list"] == "../moe/heldout.txt"
    )
    result = {"model": {"path": str(old / "export" / "moe.onnx"), "sidecar": {"checkpoint": raw["checkpoint"]}},
              "input": {"images": {"dir": str(tmp_path / "photos"), "count": 3}}}  # fmt: skip
    (old / "bench").mkdir(exist_ok=True)
    (old / "bench" / "moe.onnx.json").write_text(
        json.dumps(store_paths(result, old / "bench" / "moe.onnx.json", RESULT_PATHS))
    )
    shutil.move(old, moved_to)
    sc = read_sidecar(sidecar_path(moved_to / "export" / "moe.onnx"))
    assert sc.checkpoint == str(moved_to / "moe" / "model.safetensors")
    assert sc.details["images"]["heldout_list"] == str(moved_to / "moe" / "heldout.txt")
    back = load_paths(
        json.loads((moved_to / "bench" / "moe.onnx.json").read_text()),
        moved_to / "bench" / "moe.onnx.json",
        RESULT_PATHS,
    )
    assert back["model"]["path"] == str(moved_to / "export" / "moe.onnx")
    assert back["input"]["images"]["dir"] == str(tmp_path / "photos")  # outside: absolute


def test_a_dataset_left_behind_is_named_with_the_file_and_field(moved, tmp_path):
    """A run directory copied without the pipeline directory around it: its dataset was outside it."""
    _, new, _ = moved
    run = tmp_path / "just_the_run"
    shutil.copytree(new / "moe", run)
    with pytest.raises(
        UserError, match=r"model\.safetensors: metadata train\.data_dir: .*data.* is not there"
    ):
        evaluate(run)
    with pytest.raises(UserError, match=r"model\.safetensors: metadata train\.superclasses .* is not there"):
        evaluate(run, data_dir=read_meta(new / "moe").train.data_dir)  # --data DIR
    ok = evaluate(
        run,
        data_dir=read_meta(new / "moe").train.data_dir,
        superclasses=read_meta(new / "moe").train.superclasses,
    )
    assert ok["num_images"] == 36
