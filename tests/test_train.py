"""Training engine: configs, the loop (dense, MoE with and without a super-class map), checkpoints and resume
after SIGKILL, 2-process DDP on gloo, and the eval stage. Every run uses the ``quick`` preset (9 synthetic
classes at 16 px, a 2-block model), so a run costs a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobile_vmoe.checkpoint import load_model
from mobile_vmoe.common import UserError
from mobile_vmoe.config import dump_yaml, list_presets, load_config
from mobile_vmoe.data import scan_dataset
from mobile_vmoe.evaluate import evaluate
from mobile_vmoe.files.file_list import read_file_list
from mobile_vmoe.train import COMPLETE, Objective, find_checkpoint, train

MOE = "mobile_vmoe_nano_patch4_32"
CLI = [sys.executable, "-m", "mobile_vmoe.cli"]


def quick(tmp: Path, name: str, *overrides: str, data_root: Path | None = None):
    cfg = load_config(
        "quick", [f"data.root={data_root or tmp / 'data'}", f"out={tmp / name}", "threads=1", *overrides]
    )
    return cfg


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def truth(data_root, tmp_path_factory) -> Path:
    """The synthetic generator's true super-class map, as the superclasses stage would write it."""
    from mobile_vmoe.data import prepare_dataset

    cfg = load_config("quick")
    kw = dict(cfg.data.dataset_kwargs)
    d = prepare_dataset("synthetic", root=data_root, **kw)
    return d / "superclasses_true.json"


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def test_presets_load_and_round_trip(tmp_path):
    names = list_presets()
    assert {"quick", "synthetic", "digits", "imagenet1k_tiny", "imagenet1k_small"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name and cfg.out
        f = tmp_path / f"{name}.yaml"
        f.write_text(dump_yaml(cfg))
        again = load_config(str(f))
        assert dump_yaml(again) == dump_yaml(cfg)  # the saved RUN/config.yaml reproduces the run's config

    deit = load_config("imagenet1k_tiny")  # the DeiT recipe of the issue
    assert (deit.model, deit.batch_size, deit.optim.opt, deit.optim.base_lr, deit.optim.weight_decay) == (
        "mobile_vit_tiny_patch16_224",
        1024,
        "adamw",
        5e-4,
        0.05,
    )
    assert (deit.schedule.epochs, deit.schedule.warmup_epochs, deit.schedule.sched) == (300, 5, "cosine")
    a = deit.aug
    assert (a.auto_augment, a.mixup, a.cutmix, a.label_smoothing, a.reprob, a.drop_path) == (
        "rand-m9-mstd0.5-inc1",
        0.8,
        1.0,
        0.1,
        0.25,
        0.1,
    )
    assert deit.moe.router_loss_weight == 0.3 and deit.data.heldout_fraction == 0.01


def test_overrides_are_typed_and_checked():
    cfg = load_config("quick", ["optim.lr=1e-3", "model_kwargs.depth=3", "aug.scale=[0.5, 1]", "ema=true"])
    assert cfg.optim.lr == 1e-3 and cfg.model_kwargs["depth"] == 3 and cfg.aug.scale == (0.5, 1.0) and cfg.ema
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'.*did you mean lr"):
        load_config("quick", ["optim.lrr=1"])
    with pytest.raises(UserError, match="config key batch_size: expected int"):
        load_config("quick", ["batch_size=big"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config("quick", ["batch_size"])
    with pytest.raises(UserError, match="neither a preset"):
        load_config("no_such_preset")


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def test_dense_run_writes_the_contract(tmp_path, data_root):
    run = train(quick(tmp_path, "dense", data_root=data_root))
    for f in ("config.yaml", "heldout.txt", "model.safetensors", "metrics.jsonl"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    epochs = records(run, "epoch")
    assert [r["epoch"] for r in epochs] == [1.0, 2.0]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in epochs)
    assert epochs[-1]["train_loss"] < records(run, "train")[0]["loss"]  # it learns

    model, meta = load_model(run, expect_moe=False)
    data_dir = Path(meta.train.data_dir)
    held = read_file_list(meta.train.heldout_list, data_dir)
    index = scan_dataset(data_dir)
    assert len(held) == 2 * 9 and {s.target for s in held} == set(range(9))  # min 2 per class
    assert set(held).isdisjoint(set(index.train) - set(held)) and set(held) <= set(index.train)
    assert meta.class_names == index.class_names and model.num_classes == 9

    ckpts = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000007", "step_00000014"]  # one per epoch, keep_last=2
    assert all((c / COMPLETE).is_file() for c in ckpts)
    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)
    assert state["step"] == 14 and state["config"]["model"] == "mobile_vit_nano_patch4_32"

    r = evaluate(run, split="heldout")
    assert r["num_images"] == 18 and not r["is_moe"]
    r = evaluate(run, json_out=tmp_path / "eval.json")
    assert r["num_images"] == 36 and json.loads((tmp_path / "eval.json").read_text())["top1"] == r["top1"]
    assert r["top1"] == pytest.approx(epochs[-1]["val_top1"])  # the loop's val metric is the eval stage's


def test_moe_with_superclass_map_and_mixup(tmp_path, data_root, truth):
    cfg = quick(
        tmp_path, "moe", "aug.mixup=0.8", "aug.cutmix=1.0", "aug.label_smoothing=0.1", data_root=data_root
    )
    cfg.model, cfg.moe.superclasses = MOE, str(truth)
    run = train(cfg)
    ep = records(run, "epoch")[-1]
    assert 0 <= ep["train_router_acc"] <= 1 and 0 <= ep["val_router_acc"] <= 1
    assert sum(ep["train_expert_load"]) > 0 and len(ep["val_expert_load"]) == 3
    assert "router_loss" in records(run, "train")[-1]

    r = evaluate(run)  # the super-class map is found through the checkpoint's metadata
    assert r["is_moe"] and r["num_experts"] == 3 and r["router_accuracy"] is not None
    counts = torch.tensor(r["class_expert_counts"])
    assert counts.shape == (9, 3) and counts.sum() == r["num_images"] * r["top_k"]
    assert sum(r["expert_images_top1"]) == r["num_images"] and len(r["expert_accuracy"]) == 3

    out = subprocess.run([*CLI, "eval", "--checkpoint", str(run)], capture_output=True, text=True, check=True)
    assert "router accuracy against the super-classes" in out.stdout and "expert  images" in out.stdout


def test_moe_without_map_uses_balancing_loss(tmp_path, data_root):
    cfg = quick(tmp_path, "e2e", "schedule.max_steps=3", data_root=data_root)
    cfg.model = MOE
    run = train(cfg)
    last = records(run, "train")[-1]
    assert "balance_loss" in last and "router_loss" not in last and last["step"] == 3
    assert "train_router_acc" not in records(run, "epoch")[-1]


def test_objective_router_targets():
    """Hard labels: CE against the super-class; mixup soft labels: CE against the mixed super-class target."""
    from mobile_vmoe.models.moe import Routing

    obj = Objective(4, 2, [0, 0, 1, 1], router_loss_weight=0.3)
    logits, r_logits = torch.zeros(2, 4), torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    routing = Routing(r_logits, r_logits.argmax(1, keepdim=True), torch.ones(2, 1))
    loss, parts = obj(logits, routing, torch.tensor([1, 3]))
    ce = torch.nn.functional.cross_entropy(r_logits, torch.tensor([0, 1]))
    assert torch.allclose(parts["router_loss"], ce) and int(parts["router_correct"]) == 2
    assert torch.allclose(loss, parts["cls_loss"] + 0.3 * ce)
    soft = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])  # image 0: half super 0, half super 1
    _, parts = obj(logits, routing, soft)
    expect = -(torch.tensor([[0.5, 0.5], [0.0, 1.0]]) * r_logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(parts["router_loss"], expect)


# --------------------------------------------------------------------------------------------------------------
# Errors before training
# --------------------------------------------------------------------------------------------------------------


def test_bad_input_fails_before_training(tmp_path, data_root, truth):
    def fails(match: str, *overrides: str, model: str | None = None, sc: str | None = None) -> None:
        cfg = quick(tmp_path, "bad", *overrides, data_root=data_root)
        cfg.model = model or cfg.model
        cfg.moe.superclasses = sc
        with pytest.raises(UserError, match=match):
            train(cfg)
        assert not (tmp_path / "bad" / "checkpoints").exists()

    fails("E=4 experts", "moe_kwargs.num_experts=4", model=MOE, sc=str(truth))
    fails("dense model", sc=str(truth))
    fails("9 class folders, but model_kwargs.num_classes=10", "model_kwargs.num_classes=10")
    fails("not a mobile_vit_", model="resnet18")
    fails("fewer than one batch", "batch_size=4096")
    fails("amp", "amp=fp8")
    bad_map = tmp_path / "bad_map.json"
    bad_map.write_text(json.dumps({"assignment": [0, 1, 2]}))
    fails("'assignment' has 3 entries", model=MOE, sc=str(bad_map))
    empty = tmp_path / "imgs"
    (empty / "train" / "a").mkdir(parents=True)
    fails("holds no images", f"data.spec={empty}")

    run = train(quick(tmp_path, "twice", "schedule.max_steps=1", data_root=data_root))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(quick(tmp_path, "twice", data_root=data_root))
    assert (run / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------------------------


def test_find_checkpoint_skips_torn_ones(tmp_path, data_root, caplog):
    run = train(
        quick(tmp_path, "torn", "checkpoint.every_n_steps=3", "checkpoint.keep_last=10", data_root=data_root)
    )
    ck = run / "checkpoints"
    assert [p.name for p in sorted(ck.iterdir())] == [f"step_{s:08d}" for s in (3, 6, 7, 9, 12, 14)]
    (ck / "step_00000014" / "state.pt").write_bytes(b"torn")  # damaged despite its marker
    (ck / "step_00000012" / COMPLETE).unlink()  # written up to the marker
    found = find_checkpoint(run)
    assert found is not None and found[0].name == "step_00000009" and found[1]["step"] == 9
    assert "step_00000014" in caplog.text and "step_00000012" in caplog.text


def test_sigkill_mid_epoch_then_resume(tmp_path, data_root):
    """An uninterrupted run and a run killed mid-epoch then resumed end with the same weights."""
    over = ["schedule.epochs=6", "checkpoint.every_n_steps=3", f"data.root={data_root}", "threads=1"]
    whole = train(load_config("quick", [*over, f"out={tmp_path / 'whole'}"]))

    run = tmp_path / "killed"
    cmd = [*CLI, "train", "--config", "quick", "--out", str(run), *over, "log_interval=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    target = run / "checkpoints" / "step_00000003" / COMPLETE
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "model.safetensors").exists(), (
        "finished too soon"
    )
    saved = find_checkpoint(run)[1]["step"]
    assert 3 <= saved < 42

    out = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, check=True)
    assert f"resuming from {run / 'checkpoints'}/step_{saved:08d} (step {saved} of 42)" in out.stderr
    steps = [r["step"] for r in records(run, "train")]
    assert steps[-1] == 42 and sorted(set(steps)) == list(range(1, 43))
    assert (
        steps[steps.index(42) - (42 - saved) + 1] == saved + 1
    )  # the resumed run started after the checkpoint
    a, b = load_file(whole / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------------


def test_ddp_two_gloo_processes_end_identical(tmp_path, data_root, truth):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mobile_vmoe.cli", "train", "--config", "quick", "--model", MOE, "--superclasses", str(truth),
        "--out", str(run), f"data.root={data_root}", "threads=1", "dump_replicas=true", "batch_size=8",
        "checkpoint.every_n_steps=4",  # mid-epoch checkpoints sum the epoch's metrics over the ranks
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2, batch 4/rank" in out.stderr
    r0, r1 = load_file(run / "model.safetensors"), load_file(run / "replica_rank1.safetensors")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert load_model(run)[0].is_moe
    ep = records(run, "epoch")[-1]
    assert ep["step"] == 2 * 15 and len(ep["train_expert_load"]) == 3  # 126 images / 2 ranks / 4 per step
    state = torch.load(run / "checkpoints" / "step_00000028" / "state.pt", weights_only=True)
    assert int(state["epoch_sums"]["images"]) == 13 * 8  # step 13 of epoch 2, both ranks' images
