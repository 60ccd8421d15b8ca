"""Per-token V-MoE: buffer placement against a reference, experts against a loop, losses, training, eval."""

import json
import math

import pytest
import timm
import torch

import mobile_vmoe.models  # noqa: F401  (registers the models)
from mobile_vmoe.config import load_config
from mobile_vmoe.models.token_moe import (
    TokenExpertMlp,
    TokenRouter,
    buffer_slots,
    expert_capacity,
    routing_stats,
)
from mobile_vmoe.models.vmoe import moe_block_indices

TOKEN = "mobile_vmoe_token_nano_patch8_32"


def _reference_slots(
    idx: torch.Tensor, gates: torch.Tensor, E: int, P: int, bpr: bool, first: list[int] = ()
) -> torch.Tensor:
    """V-MoE's placement written as loops: K-major, in token order or by descending top gate (the tokens in
    ``first`` ahead of the others)."""
    G, N, K = idx.shape
    out = torch.empty_like(idx)
    for g in range(G):
        order = (
            sorted(range(N), key=lambda i, g=g: (i not in first, -float(gates[g, i, 0]))) if bpr else range(N)
        )
        count = [0] * E
        for k in range(K):
            for i in order:
                e = int(idx[g, i, k])
                out[g, i, k] = e * P + count[e] if count[e] < P else E * P
                count[e] += 1
    return out


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("priority", ["vanilla", "bpr", "bpr_cls"])
@pytest.mark.parametrize("ratio", [0.25, 1.0, 2.0])
def test_buffer_slots_match_reference(priority, ratio, K):
    torch.manual_seed(1)
    G, N, E = 3, 17, 5
    gates, idx = torch.randn(G, N, E).softmax(-1).topk(K, dim=-1)
    P = expert_capacity(N, K, ratio, E)
    assert P == max(1, min(N, math.ceil(K * N * ratio / E)))
    bpr = priority != "vanilla"
    first = [0, 9] if priority == "bpr_cls" else []  # two images of 9 and 8 tokens: their class tokens
    mask = torch.zeros(N, dtype=torch.bool)
    mask[first] = True
    got = buffer_slots(idx, gates, E, P, bpr, first=mask if first else None)
    torch.testing.assert_close(got, _reference_slots(idx, gates, E, P, bpr, first))
    for g in range(G):  # a slot of a group's buffers holds one token
        kept = got[g][got[g] < E * P]
        assert kept.unique().numel() == kept.numel()


def test_bpr_keeps_the_most_confident_tokens():
    """At a small capacity, BPR keeps the tokens with the highest top gate; vanilla keeps the first ones."""
    N, E = 8, 2
    idx = torch.zeros(1, N, 1, dtype=torch.long)  # every token wants expert 0
    gates = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.8, 0.4, 0.5, 0.6]).reshape(1, N, 1)
    P = 2
    vanilla = buffer_slots(idx, gates, E, P, bpr=False)[0, :, 0]
    bpr = buffer_slots(idx, gates, E, P, bpr=True)[0, :, 0]
    assert (vanilla < E * P).nonzero().flatten().tolist() == [0, 1]
    assert (bpr < E * P).nonzero().flatten().tolist() == [2, 4]
    first = torch.tensor([True, False, False, False, True, False, False, False])  # 2 images: class tokens
    cls = buffer_slots(idx, gates, E, P, bpr=True, first=first)[0, :, 0]
    assert (cls < E * P).nonzero().flatten().tolist() == [0, 4]  # the class tokens, however low their gates


def test_bpr_cls_keeps_every_class_token_where_there_is_room():
    """Routed 8 images together at capacity 0.25 (P=4 slots per expert, E=2): plain BPR may drop an image's
    class token, which the head reads; with priority bpr_cls none is dropped, and as many choices are kept."""
    torch.manual_seed(0)
    m = timm.create_model(TOKEN, num_classes=5, num_experts=2, depth=2, num_moe_layers=1).eval()
    x = torch.randn(8, 3, 32, 32)
    T = 17  # 16 patches and the class token
    kept = {}
    for cls_first in (False, True):
        m.set_routing(capacity_ratio=0.25, bpr=True, group_size=8, cls_first=cls_first)
        with torch.no_grad():
            r = m.forward_with_routing(x)[1][0]
        assert r.capacity == expert_capacity(8 * T, 1, 0.25, 2) == 17
        dropped = r.slot[0, :, 0] == 2 * r.capacity
        kept[cls_first] = int((~dropped).sum())
        if cls_first:
            assert not dropped[::T].any()
    assert kept[True] == kept[False]
    assert "cls_first=False/True" in repr(m.blocks[1].mlp)
    # no class token: bpr_cls has nothing to put first
    avg = timm.create_model(
        TOKEN, num_classes=5, num_experts=2, depth=2, class_token=False, global_pool="avg"
    )
    with pytest.raises(ValueError, match="class token"):
        avg.set_routing(cls_first=True)


def test_experts_match_a_loop_over_tokens_and_drop_to_zero():
    torch.manual_seed(0)
    G, N, D, H, E, K = 2, 11, 8, 16, 4, 2
    mlp, router = TokenExpertMlp(D, H, E), TokenRouter(D, E, K).eval()
    x = torch.randn(G, N, D)
    r = router(x, expert_capacity(N, K, 0.5, E), True)
    y = mlp(x, r)
    ref = torch.zeros_like(x)
    for g in range(G):
        for i in range(N):
            for k in range(K):
                if r.slot[g, i, k] < E * r.capacity:  # a dropped choice adds nothing
                    e = r.expert_idx[g, i, k]
                    h = torch.nn.functional.gelu(x[g, i] @ mlp.fc1_weight[e] + mlp.fc1_bias[e])
                    ref[g, i] += r.gates[g, i, k] * (h @ mlp.fc2_weight[e] + mlp.fc2_bias[e])
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    load, dropped = routing_stats(r, E)
    assert int(load.sum()) == int((r.slot < E * r.capacity).sum()) and 0 < float(dropped) < 1


def test_router_losses():
    """Importance loss: squared CV of the summed gates; load loss only with noise, from P(in top K)."""
    torch.manual_seed(0)
    router = TokenRouter(8, 4, top_k=1, noise_std=1.0)
    x = torch.randn(2, 32, 8)
    router.eval()
    r = router(x, 8, False)
    imp = r.probs.sum(dim=1)
    want = (imp.var(dim=-1, unbiased=False) / imp.mean(dim=-1) ** 2).mean()
    torch.testing.assert_close(r.importance_loss, want)
    assert float(r.load_loss) == 0.0  # no noise at eval
    router.train()
    r = router(x, 8, False)
    assert float(r.load_loss) > 0
    (r.importance_loss + r.load_loss).backward()
    assert router.proj.weight.grad.abs().sum() > 0
    assert router.proj.bias is None  # V-MoE's router is bias-free


def test_placement_and_inference_routing():
    assert moe_block_indices(12, 2, "last") == [10, 11]
    assert moe_block_indices(12, 2, "every") == [1, 3, 5, 7, 9, 11]
    assert moe_block_indices(12, 2, "vmoe_last") == [9, 11]  # V-MoE's "Last 2" of ViT-B
    assert moe_block_indices(8, 2, "vmoe_last") == [5, 7]
    assert moe_block_indices(6, 3, "vmoe_last") == [1, 3, 5]
    with pytest.raises(ValueError, match="odd blocks"):
        moe_block_indices(6, 4, "vmoe_last")
    with pytest.raises(ValueError, match="moe_placement"):
        moe_block_indices(12, 2, "first")
    m = timm.create_model(TOKEN, num_classes=5, num_experts=4, moe_placement="every", num_moe_layers=2).eval()
    assert m.moe_indices == [1, 3, 5, 7, 9, 11] and m.num_moe_layers == 6
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full, routing = m.forward_with_routing(x)
        assert len(routing) == 6 and all(
            r.capacity == expert_capacity(17, 1, 1.05, 4) for r in routing
        )  # one image per group at eval
        m.set_routing(capacity_ratio=0.1, bpr=False)
        low, routing = m.forward_with_routing(x)
        assert routing[0].capacity == expert_capacity(17, 1, 0.1, 4)
        assert float(routing_stats(routing[0], 4)[1]) > 0.5 and not torch.allclose(full, low)
        m.set_routing(top_k=2)
        assert m.forward_with_routing(x)[1][0].expert_idx.shape[-1] == 2
    with pytest.raises(ValueError, match="capacity_ratio"):
        m.set_routing(capacity_ratio=0)


def test_export_keeps_static_shapes():
    m = timm.create_model(TOKEN, num_classes=5, num_experts=4, depth=3).eval()
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("scatter" in o for o in ops) and any("gather" in o for o in ops)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    from mobile_vmoe.train import train

    tmp = tmp_path_factory.mktemp("vmoe")
    cfg = load_config(
        "quick",
        [f"data.root={tmp / 'data'}", f"out={tmp / 'run'}", "threads=1", "schedule.max_steps=4",
         f"model={TOKEN}", "model_kwargs.depth=4", "moe_kwargs.num_experts=4"],
    )  # fmt: skip
    return train(cfg)


def test_training_logs_aux_losses_and_block_statistics(token_run):
    from mobile_vmoe.evaluate import evaluate

    run = token_run
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r["kind"] == "train"][-1]
    assert last["importance_loss"] > 0 and last["load_loss"] > 0 and "balance_loss" not in last
    epoch = [r for r in recs if r["kind"] == "epoch"][-1]
    L = 1  # the quick preset: one MoE block
    assert len(epoch["train_expert_load"]) == L and len(epoch["train_expert_load"][0]) == 4
    assert len(epoch["train_dropped"]) == L and all(0 <= d <= 1 for d in epoch["train_dropped"])
    res = evaluate(run)
    assert len(res["expert_load"]) == L and len(res["dropped_fraction"]) == L
    w = torch.tensor(res["class_expert_weight"])  # [L, C, E]: each class's mean routing weights sum to 1
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2], dtype=w.dtype), atol=1e-6, rtol=0)


def test_eval_capacity_sweep_writes_curve_and_plot(token_run, tmp_path, capsys):
    from mobile_vmoe.cli import main
    from mobile_vmoe.files.capacity_curve import read_capacity_curve

    out = tmp_path / "curve.json"
    args = ["eval", "--checkpoint", str(token_run), "--capacity-ratio", "4", "0.5", "0.1", "--json", str(out)]
    assert main(args) == 0
    curve = read_capacity_curve(out)
    assert [(p.priority, p.capacity_ratio) for p in curve.points] == [
        (pr, r) for pr in ("bpr", "vanilla", "bpr_cls") for r in (4.0, 0.5, 0.1)
    ]  # bpr_cls: the model has a class token
    assert curve.priorities() == ["bpr", "vanilla", "bpr_cls"]
    for pr in curve.priorities():  # fewer slots, more dropped choices; ratio 4: room for every token
        drops = [p.dropped_fraction[0] for p in curve.points if p.priority == pr]
        # 5 tokens per image into E * P = 4 slots at 0.1: at least one of five is dropped
        assert drops[0] == 0.0 and drops[0] <= drops[1] <= drops[2] and drops[2] >= 0.2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # one setting: the ordinary report, under that routing
    assert (
        main(["eval", "--checkpoint", str(token_run), "--capacity-ratio", "0.1", "--priority", "vanilla"])
        == 0
    )
    assert "capacity ratio 0.1, priority vanilla" in capsys.readouterr().out


def test_capacity_sweep_over_group_sizes_says_when_ratios_share_a_buffer(token_run, tmp_path, caplog, capsys):
    """5 tokens per image, E=4: alone, every ratio <= 0.6 leaves P=1 (one routing measured three times); routed
    4 images together, the same ratios keep buffers of their own (the flat-curve flaw the group sweep fixes)."""
    from mobile_vmoe.cli import main
    from mobile_vmoe.files.capacity_curve import read_capacity_curve

    out = tmp_path / "groups.json"
    args = ["eval", "--checkpoint", str(token_run), "--capacity-ratio", "1", "0.5", "0.25", "--priority", "bpr",
            "--group-size", "1", "4", "--batch-size", "8", "--json", str(out)]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    curve = read_capacity_curve(out)
    assert curve.group_sizes() == [1, 4]
    assert [(p.group_size, p.capacity_ratio, p.capacity) for p in curve.points] == [
        (1, 1.0, 2), (1, 0.5, 1), (1, 0.25, 1), (4, 1.0, 5), (4, 0.5, 3), (4, 0.25, 2),
    ]  # fmt: skip
    assert curve.same_routing() == [(1, [0.5, 0.25], 1)]
    assert "ratios 0.5, 0.25 give the same buffer with 1 image(s) per group" in caplog.text
    alone, grouped = curve.point("bpr", 0.5, 1), curve.point("bpr", 0.5, 4)
    assert curve.top1("bpr", 0.5) == alone.top1 and grouped.group_size == 4
    # a group that does not divide the batch is refused before any image is read
    assert main([*args[:-2], "--batch-size", "6", "--json", str(tmp_path / "x.json")]) == 2
    assert "--group-size 4 must divide --batch-size 6" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_pipeline_refuses_pareto_ratios_with_one_buffer(tmp_path):
    from mobile_vmoe.common import UserError
    from mobile_vmoe.pipeline import _check_pareto_ratios, load_pipeline_config, run_pipeline

    # 17 tokens per image, E=10: ratios 0.5 and 0.25 both leave P=1 at batch 1, the same .pte twice
    cfg = load_pipeline_config(
        "quick", ["vmoe_model=mobile_vmoe_token_nano_patch8_32", "capacity_ratios=[1.0,0.5,0.25]",
                  "pareto_capacity_ratios=[0.5,0.25]", "vmoe_overrides=[moe_kwargs.num_experts=10]"],
    )  # fmt: skip
    match = r"0.25 gives the same buffer as 0.5 at batch 1 \(P=1"
    with pytest.raises(UserError, match=match):  # the check itself first: it must not start a pipeline
        _check_pareto_ratios(cfg, timm.create_model(cfg.vmoe_model, img_size=32, num_experts=10))
    with pytest.raises(UserError, match=match):
        run_pipeline(cfg, tmp_path / "p")
    assert not (tmp_path / "p" / "stages").exists()
    for preset in ("threeway", "threeway_mnist", "threeway_digits"):  # the shipped presets pass the check
        c = load_pipeline_config(preset)
        assert c.capacity_group_sizes == [1, 8] and c.pareto_capacity_ratios
        _check_pareto_ratios(c, timm.create_model(c.vmoe_model))


def test_eval_routing_options_need_a_per_token_model(tmp_path, capsys):
    import timm

    from mobile_vmoe.checkpoint import ModelMeta, save_model
    from mobile_vmoe.cli import main
    from mobile_vmoe.preprocess import Preprocess

    m = timm.create_model("mobile_vmoe_nano_patch8_32", num_classes=3, num_experts=2)
    save_model(tmp_path / "m.safetensors", m, ModelMeta("mobile_vmoe_nano_patch8_32", {"num_classes": 3, "num_experts": 2},
               ["a", "b", "c"], Preprocess.for_model(m)))  # fmt: skip
    (tmp_path / "val" / "a").mkdir(parents=True)
    assert main(["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--data", str(tmp_path),
                 "--capacity-ratio", "0.5"]) == 2  # fmt: skip
    assert "per-token V-MoE" in capsys.readouterr().err
