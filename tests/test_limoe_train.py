"""Image-text training (``mobile-vmoe train`` of LIMoE / CLIP models) and evaluation (``mobile-vmoe eval``: zero-shot,
retrieval, routing by modality). Runs use a tiny built-in caption set (6 classes, 16 px, 96 train pairs) and
2-block nano models, so a run costs seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import mobile_vmoe.models  # noqa: F401  (registers the models)
from mobile_vmoe.builtin_captions import prepare_caption_set
from mobile_vmoe.captions import caption_splits, read_caption_set
from mobile_vmoe.checkpoint import load_model, read_meta
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.config import load_config
from mobile_vmoe.evaluate_image_text import (
    RoutingCounts,
    evaluate_image_text,
    pair_loader,
    retrieval_recall,
    summarize_routing,
    zero_shot_accuracy,
)
from mobile_vmoe.files.image_text_eval import read_image_text_eval
from mobile_vmoe.models.token_moe import routing_stats
from mobile_vmoe.preprocess import Preprocess
from mobile_vmoe.text import Tokenizer
from mobile_vmoe.train import train

LIMOE, ONETOWER, CLIP = (
    "mobile_limoe_nano_patch8_32",
    "mobile_onetower_nano_patch8_32",
    "mobile_clip_nano_patch8_32",
)
TINY_SET = "{num_superclasses: 3, num_fine: 2, train_per_class: 8, val_per_class: 4, image_size: 16}"


def tiny(tmp: Path, name: str, data_root: Path, *overrides: str):
    """The limoe_synthetic preset shrunk: 16 px images (4 tokens), 2 blocks (the second one MoE), batch 8."""
    return load_config(
        "limoe_synthetic",
        [f"data.dataset_kwargs={TINY_SET}", "data.image_size=16", "model_kwargs.depth=2", "batch_size=8",
         "schedule.epochs=2", "schedule.warmup_epochs=0", "log_interval=1", "threads=1", f"data.root={data_root}",
         f"out={tmp / name}", *overrides],
    )  # fmt: skip


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def limoe_run(tmp_path_factory, data_root) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    return train(tiny(tmp, "limoe", data_root, "schedule.epochs=4", "optim.lr=2e-3"))


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_a_zero_shot_model(limoe_run):
    steps = records(limoe_run, "train")
    assert [r["step"] for r in steps] == list(range(1, 49))  # 96 pairs / 8 = 12 steps x 4 epochs
    first = sum(r["contrastive_loss"] for r in steps[:6]) / 6
    last = sum(r["contrastive_loss"] for r in steps[-6:]) / 6
    assert last < first - 0.3, (first, last)  # log(8) = 2.08 at chance
    for key in ("image_local_entropy", "text_global_entropy", "image_load_loss", "text_dropped"):
        assert key in steps[-1]
    ep = records(limoe_run, "epoch")[-1]
    assert 0 <= ep["val_zero_shot_top1"] <= ep["val_zero_shot_top5"] <= 1 and 0 <= ep["val_i2t_r1"] <= 1
    assert 0 <= ep["val_image_success"] <= 1 and 1 <= ep["val_text_experts_used"] <= 8
    model, meta = load_model(limoe_run)
    assert model.is_moe and meta.model == LIMOE and meta.train.step == 48
    assert len(meta.class_names) == 6 and "red" in meta.class_names[0]
    assert meta.prompt_templates and all("{}" in t for t in meta.prompt_templates)
    assert meta.preprocess.size == 16 and Path(meta.train.data_dir).name.startswith("synthetic-captions")


@pytest.mark.parametrize("name", [ONETOWER, CLIP])
def test_dense_baselines_train_with_the_same_preset(tmp_path, data_root, name):
    run = train(tiny(tmp_path, name, data_root, f"model={name}", "schedule.epochs=1"))
    assert not load_model(run)[0].is_moe
    last = records(run, "train")[-1]
    assert "image_local_entropy" not in last and last["loss"] == last["contrastive_loss"]


def test_entropy_losses_can_be_turned_off(tmp_path, data_root):
    """``image_text.entropy_losses=false``: the loss is contrastive + importance/load only (LIMoE baseline)."""
    off = tiny(tmp_path, "off", data_root, "schedule.max_steps=1", "image_text.entropy_losses=false",
               "moe.importance_loss_weight=0", "moe.load_loss_weight=0")  # fmt: skip
    r = records(train(off), "train")[0]
    assert r["image_local_entropy"] > 0 and r["loss"] == pytest.approx(r["contrastive_loss"], abs=1e-6)
    on = records(train(tiny(tmp_path, "on", data_root, "schedule.max_steps=1")), "train")[0]
    assert on["loss"] > on["contrastive_loss"] + 0.01 * on["image_local_entropy"]


def test_a_caption_table_of_ones_own_trains_and_evaluates(tmp_path, data_root, limoe_run):
    """``--data`` a single caption table: trained on whole (no val split, no per-epoch evaluation); ``eval --data``
    another table; class names from the classes.json one folder up."""
    built = Path(read_meta(limoe_run).train.data_dir)
    run = train(
        tiny(
            tmp_path, "table", data_root, f"data.spec={built / 'train' / 'captions.csv'}", "schedule.epochs=1"
        )
    )
    assert "val_zero_shot_top1" not in records(run, "epoch")[-1]
    assert read_meta(run).train.data_dir == str(built / "train" / "captions.csv")
    ev = evaluate_image_text(run, data=built / "val" / "captions.csv")
    assert ev.zero_shot.num_classes == 6 and ev.retrieval.num_captions == 24 and ev.routing is not None


def test_resume_after_interruption_ends_with_the_uninterrupted_weights(tmp_path, data_root):
    over = ["checkpoint.every_n_steps=5"]
    whole = train(tiny(tmp_path, "whole", data_root, *over))
    part = train(tiny(tmp_path, "part", data_root, *over, "schedule.max_steps=7"))  # stops mid-epoch 1
    assert sorted(p.name for p in (part / "checkpoints").iterdir())[-1] == "step_00000007"
    resumed = train(tiny(tmp_path, "part", data_root, *over, "resume=true"))
    steps = [r["step"] for r in records(resumed, "train")]
    assert steps == list(range(1, 8)) + list(range(8, 25))  # continued at step 8, not from the start
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    epoch_1 = [r for r in records(resumed, "epoch") if r["step"] == 12][-1]
    assert epoch_1["train_loss"] == pytest.approx(
        [r for r in records(whole, "epoch") if r["step"] == 12][0]["train_loss"], rel=1e-5
    )  # the resumed epoch's record covers its whole epoch


# --------------------------------------------------------------------------------------------------------------
# Distributed: the contrastive loss sees every rank's pairs
# --------------------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, timm, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import mobile_vmoe.models
from mobile_vmoe.models import ContrastiveObjective
from mobile_vmoe.text import Tokenizer
from mobile_vmoe.train_image_text import PairForward

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = timm.create_model("{model}", depth=2, img_size=16)
images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
tokens = Tokenizer(32)([f"caption number {{i}} of eight" for i in range(8)]).tokens
B = 8 // world
ddp = DDP(PairForward(model))  # kept: its reducer must outlive the backward
out, routings = ddp(images[rank * B : (rank + 1) * B], tokens[rank * B : (rank + 1) * B])
loss, _ = ContrastiveObjective(0, rank=rank, world_size=world)(out, routings)
loss.backward()  # DDP averages the gradients over the ranks
losses = [torch.zeros(()) for _ in range(world)]
dist.all_gather(losses, loss.detach())
if rank == 0:
    grads = {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    torch.save({{"losses": torch.stack(losses), "grads": grads}}, sys.argv[1])
dist.destroy_process_group()
"""


def test_ddp_contrastive_loss_uses_every_ranks_negatives(tmp_path):
    """Two gloo processes with 4 pairs each: their mean loss and DDP's gradients equal one process's on all 8
    pairs, which differs from the loss of 4 pairs without the other rank's negatives."""
    from mobile_vmoe.models import ContrastiveObjective

    script, out = tmp_path / "ddp_check.py", tmp_path / "ddp.pt"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(model=ONETOWER)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    model = timm.create_model(ONETOWER, depth=2, img_size=16)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = Tokenizer(32)([f"caption number {i} of eight" for i in range(8)]).tokens
    full, _ = ContrastiveObjective(0)(*model.forward_with_routing(images, tokens))
    full.backward()
    assert float(ddp["losses"].mean()) == pytest.approx(full.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        alone = ContrastiveObjective(0)(*model.forward_with_routing(images[:4], tokens[:4]))[0]
    assert abs(float(alone) - float(ddp["losses"][0])) > 1e-3  # rank 0 did see rank 1's captions


def test_ddp_training_run_ends_with_identical_replicas(tmp_path, data_root):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mobile_vmoe.cli", "train", "--config", "limoe_synthetic", "--out", str(run),
        f"data.dataset_kwargs={TINY_SET}", "data.image_size=16", "model_kwargs.depth=2", "batch_size=8",
        "schedule.epochs=1", f"data.root={data_root}", "threads=1", "dump_replicas=true", "log_interval=4",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2, batch 4/rank" in out.stderr
    r0, r1 = load_file(run / "model.safetensors"), load_file(run / "replica_rank1.safetensors")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert records(run, "epoch")[-1]["step"] == 12  # 96 pairs / 2 ranks / 4 per rank


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def test_zero_shot_and_retrieval_on_hand_built_embeddings():
    e = torch.eye(6)
    classes = e[:3]  # 3 classes along the first axes
    images = torch.stack([e[0], e[1], 0.6 * e[1] + 0.4 * e[2], e[4] + 0.1 * e[2] + 0.05 * e[1]])
    labels = torch.tensor([0, 2, 2, 0])
    # nearest class per image: 0, 1, 1, 2 -> top-1 1/4; ranks of the true class: 1, 2, 2, 3 -> top-2 3/4
    assert zero_shot_accuracy(images, labels, classes) == (0.25, 1.0)  # top-5 of 3 classes: always a hit

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(12, 5, generator=g)
    image_of_text = torch.randint(0, 7, (12,), generator=g)
    image_of_text[:7] = torch.arange(7)  # every image has a caption
    for k in (1, 3, 5):
        sim = img @ txt.T
        i2t = (
            sum(any(image_of_text[j] == i for j in sim[i].argsort(descending=True)[:k]) for i in range(7)) / 7
        )
        t2i = sum(image_of_text[t] in sim[:, t].argsort(descending=True)[:k] for t in range(12)) / 12
        assert retrieval_recall(img, txt, image_of_text, k) == pytest.approx((i2t, t2i))
    # perfect embeddings: every caption equals its (normalised) image
    unit = torch.nn.functional.normalize(img, dim=1)
    assert retrieval_recall(unit, unit[image_of_text], image_of_text, 1) == (1.0, 1.0)


def test_routing_analysis_adds_up_and_matches_routing_stats(data_root):
    kwargs = dict(num_superclasses=3, num_fine=2, train_per_class=8, val_per_class=4, image_size=16)
    val = read_caption_set(
        caption_splits(prepare_caption_set("synthetic-captions", data_root, 0, **kwargs))[-1]
    )
    torch.manual_seed(0)
    model = timm.create_model(LIMOE, depth=4, img_size=16).eval()
    model.set_routing(capacity_ratio=0.5)  # small buffers: some tokens are dropped
    loader = pair_loader(val, Tokenizer(32), Preprocess.for_model(model).transform(), batch_size=7)
    counts = RoutingCounts.zeros(model.num_moe_layers, 8)
    images, tokens = [], []
    with torch.no_grad():
        for batch_images, batch_tokens, _, _ in loader:
            counts.add(model.forward_with_routing(batch_images, batch_tokens)[1], 8)
            images.append(batch_images)
            tokens.append(batch_tokens)
        # eval routing is per pair (eval_group_size 1): one pass over all pairs routes every token alike
        whole = model.forward_with_routing(torch.cat(images), torch.cat(tokens))[1]
    a = summarize_routing(counts, model.moe_indices, 0.5, True)
    n_text = int((torch.cat(tokens) != 0).sum())
    assert [b.block for b in a.blocks] == model.moe_indices == [1, 3]
    for b, r in zip(a.blocks, whole):
        image_load, image_dropped = routing_stats(r.image, 8)
        text_load, text_dropped = routing_stats(r.text, 8, r.text_mask)
        assert b.image_tokens == image_load.tolist() and b.text_tokens == text_load.tolist()
        assert b.image_success == pytest.approx(1 - float(image_dropped))
        assert b.text_success == pytest.approx(1 - float(text_dropped))
        assert sum(b.image_tokens) / b.image_success == pytest.approx(24 * 4)  # 24 pairs x 4 patch tokens
        assert sum(b.text_tokens) / b.text_success == pytest.approx(n_text)
        for i, t in zip(b.image_share, b.text_share):
            assert i is None and t is None or i + t == pytest.approx(1.0)
        assert 1 <= b.image_experts_used <= 8 and 1 <= b.text_experts_used <= 8
    assert 0 <= a.text_success <= 1 and 0 < a.image_success < 1  # buffers at half the tokens drop some


def test_eval_verb_writes_the_result_file(limoe_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(limoe_run), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zero-shot (6 classes" in text and "retrieval R@1" in text and "routing (capacity" in text
    ev = read_image_text_eval(out)
    assert ev.model == LIMOE and ev.is_moe and ev.source.endswith("val") and ev.skipped == 0
    assert ev.zero_shot.num_images == 24 and ev.retrieval.num_captions == 24
    assert ev.routing.num_experts == 8 and [b.block for b in ev.routing.blocks] == [1]
    again = evaluate_image_text(limoe_run)
    assert again.zero_shot == ev.zero_shot and again.retrieval == ev.retrieval  # deterministic, and from JSON
    ep = records(limoe_run, "epoch")[-1]
    assert ep["val_zero_shot_top1"] == pytest.approx(ev.zero_shot.top1)  # training's evaluation is the same


# --------------------------------------------------------------------------------------------------------------
# Bad input: one clear error before any work
# --------------------------------------------------------------------------------------------------------------


def test_bad_input_fails_before_training(tmp_path, data_root, limoe_run, capsys):
    def fails(match: str, *overrides: str) -> None:
        cfg = tiny(tmp_path, "bad", data_root, *overrides)
        with pytest.raises(UserError, match=match):
            train(cfg)
        assert not (tmp_path / "bad").exists()

    fails(r"image_text.local_entropy_weight must be >= 0", "image_text.local_entropy_weight=[-0.1, 0.01]")
    fails(
        r"'synthetic' is an image-classification dataset; .* --dataset synthetic-captions",
        "data.spec=synthetic",
    )
    fails(r"caption set not found: /no/such/captions.csv", "data.spec=/no/such/captions.csv")
    fails(
        r"global_entropy_experts: S must be at most the E=8 experts",
        "image_text.global_entropy_experts=[9, 0]",
    )
    fails(
        r"image_text.classic_losses: expected one of per_modality, joint, got 'all'",
        "image_text.classic_losses=all",
    )
    built = tmp_path / "fresh-data"
    fails(r"is a caption set; mobile_vit_nano_patch8_32 is an image classifier", "model=mobile_vit_nano_patch8_32",
          f"data.root={built}")  # fmt: skip
    assert not built.exists()  # refused before the caption set was built
    assert main(["eval", "--checkpoint", str(limoe_run), "--split", "heldout"]) == 2
    assert "--split heldout applies to classifiers only" in capsys.readouterr().err
    assert read_meta(limoe_run).model == LIMOE
