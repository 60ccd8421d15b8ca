"""Training reliability: the run directory's lock, config and checkpoints under resume, damage and misuse, and
the user's own data (a tiny ImageFolder). Runs use the ``quick`` preset (9 synthetic classes at 16 px, 7 steps
per epoch, 2 epochs)."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import CLI, quick, records

from mobile_vmoe.checkpoint import read_meta
from mobile_vmoe.common import UserError
from mobile_vmoe.train import COMPLETE, find_checkpoint, train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def image_folder(root: Path, classes: int = 3, per_class: int = 6, readable: bool = True) -> Path:
    """``root/train/<class>/<i>.png``: 16 px images of one colour per class, or files that are not images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            if readable:
                px = np.clip(rng.normal(80 * c + 40, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
            else:
                (d / f"{i}.png").write_bytes(b"not a png")
    return root


# --------------------------------------------------------------------------------------------------------------
# Resume: what may change, what is kept
# --------------------------------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_and_keeps_config_yaml(tmp_path, data_root):
    run = train(quick(tmp_path, "r", "schedule.max_steps=3", data_root=data_root))
    saved = (run / "config.yaml").read_text()
    refused = quick(
        tmp_path, "r", "schedule.max_steps=3", "optim.lr=1e-3", "batch_size=8", data_root=data_root
    )
    refused.resume = True
    with pytest.raises(UserError, match=r"batch_size: 16 -> 8; optim\.lr: 0\.002 -> 0\.001") as e:
        train(refused)
    assert "may change only" in str(e.value) and "schedule.epochs" in str(e.value)
    assert (run / "config.yaml").read_text() == saved  # nothing written by the refused run

    longer = quick(tmp_path, "r", "schedule.max_steps=5", "log_interval=2", data_root=data_root)
    longer.resume = True
    train(longer)  # what may change: how long it runs and how it logs
    assert "max_steps: 5" in (run / "config.yaml").read_text()
    assert records(run, "train")[-1]["step"] == 5


def test_resumed_epoch_loss_covers_the_whole_epoch(tmp_path, data_root):
    """An epoch interrupted at step 3 of 7 and resumed reports the train_loss of all 7 steps."""
    whole = train(quick(tmp_path, "whole", "checkpoint.every_n_steps=3", data_root=data_root))
    cut = quick(tmp_path, "cut", "checkpoint.every_n_steps=3", "schedule.max_steps=3", data_root=data_root)
    run = train(cut)
    again = quick(tmp_path, "cut", "checkpoint.every_n_steps=3", data_root=data_root)
    again.resume = True
    train(again)
    want = {r["step"]: r for r in records(whole, "epoch")}
    got = {r["step"]: r for r in records(run, "epoch")}  # the last record per step wins
    for step in (7, 14):
        assert got[step]["train_loss"] == pytest.approx(want[step]["train_loss"], rel=1e-5), step


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path, data_root, caplog):
    cfg = quick(tmp_path, "dmg", "checkpoint.every_n_steps=3", "checkpoint.keep_last=10", data_root=data_root)
    run = train(cfg)
    ck = run / "checkpoints"
    newest = ck / "step_00000014" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by a full disk
    found = find_checkpoint(run)
    assert found is not None and found[0].name == "step_00000012"  # the weights must read, not only the state
    caplog.clear()
    cfg.resume = True
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert "step_00000014 is damaged" in caplog.text
    assert f"resuming from {ck / 'step_00000012'}" in caplog.text
    aside = ck / "step_00000014.damaged"
    assert aside.is_dir() and (aside / COMPLETE).is_file()  # kept for inspection, no longer a checkpoint
    assert find_checkpoint(run)[0].name == "step_00000014"  # written again, whole
    assert records(run, "train")[-1]["step"] == 14


# --------------------------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------------------------


def test_second_training_into_a_locked_run_is_refused(tmp_path, data_root):
    """Two processes (a CLI training and this one): the second training into the same --out fails at once, and
    the lock dies with the first."""
    run = tmp_path / "locked"
    cmd = [*CLI, "train", "--config", "quick", "--out", str(run), f"data.root={data_root}", "threads=1"]
    log_file = tmp_path / "first.log"
    with open(log_file, "w") as log_fh:
        first = subprocess.Popen([*cmd, "schedule.epochs=500"], stdout=log_fh, stderr=log_fh)
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.yaml").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, log_file.read_text()[-2000:]
        msg = f"{run}: another training is writing this run directory \\(pid {first.pid} holds"
        with pytest.raises(UserError, match=msg):
            train(quick(tmp_path, "locked", data_root=data_root))
        assert first.poll() is None  # the first one is unharmed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    train(
        quick(tmp_path, "locked", "schedule.max_steps=1", "resume=true", data_root=data_root)
    )  # lock released


def test_out_that_cannot_be_created(tmp_path, data_root):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match=f"--out {a_file / 'run'}: cannot create it, {a_file} is a file"):
        train(quick(tmp_path, "file/run", data_root=data_root))
    with pytest.raises(UserError, match="exists and is not a directory"):
        train(quick(tmp_path, "file", data_root=data_root))


# --------------------------------------------------------------------------------------------------------------
# The user's own data
# --------------------------------------------------------------------------------------------------------------


def test_own_data_with_a_preset_made_for_a_builtin_dataset(tmp_path):
    """The quick preset carries synthetic-dataset options; they do not apply to (nor block) --data DIR."""
    data = image_folder(tmp_path / "imgs")
    cfg = quick(tmp_path, "own", f"data.spec={data}", "batch_size=4", "data.heldout_min_per_class=1")
    assert cfg.data.dataset_kwargs  # the preset's, untouched
    run = train(cfg)
    meta = read_meta(run)
    assert meta.class_names == ["class0", "class1", "class2"] and Path(meta.train.data_dir) == data
    assert records(run, "epoch")[-1]["step"] == 2 * 3  # (18 - 3 held out) // 4 steps per epoch, 2 epochs


def test_every_image_unreadable_is_an_error(tmp_path):
    data = image_folder(tmp_path / "bad", readable=False)
    cfg = quick(tmp_path, "bad", f"data.spec={data}", "batch_size=4", "data.heldout_min_per_class=1")
    # the loop's own check, or data.check_images's before it (which names the files)
    with pytest.raises(UserError, match=r"no training image of epoch 1 could be read|class0/0\.png"):
        train(cfg)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_init_from_is_recorded(tmp_path, data_root):
    pytest.importorskip("mobile_vmoe.models.init_from")
    start = train(quick(tmp_path, "start", "schedule.max_steps=1", data_root=data_root))
    run = tmp_path / "tuned"
    cmd = [*CLI, "train", "--config", "quick", "--out", str(run), f"data.root={data_root}", "threads=1",
           "schedule.max_steps=1", "--init-from", str(start / "model.safetensors")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_meta(run).train.init_from == str(start / "model.safetensors")
