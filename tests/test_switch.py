"""The expert switch (export/switch.py): experts as torch.cond branches with constant weights, in eager PyTorch,
ONNX Runtime (If nodes; mixed batches take the gather form) and ExecuTorch (one XNNPACK delegate per expert)."""

from __future__ import annotations

import collections

import onnx
import pytest
import timm
import torch
from mobile_vmoe.export.onnx_export import OnnxRunner, export_onnx
from mobile_vmoe.export.pte import PteRunner, lower_pte
from mobile_vmoe.export.switch import ExpertSwitch, switch_experts

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.models.moe import ExpertMlp

MOE = "mobile_vmoe_nano_patch4_32"


def tiny_moe(top_k: int, num_experts: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(MOE, depth=3, img_size=16, num_experts=num_experts, top_k=top_k).eval()
    # distinct experts and non-zero biases, so that running the wrong expert shows
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ExpertMlp):
                for p in (m.fc1_weight, m.fc2_weight):
                    p.normal_(0, 0.2)
                m.fc1_bias.normal_(0, 0.2)
                m.fc2_bias.normal_(0, 0.2)
    return model


def images(model: torch.nn.Module, n: int, seed: int = 1) -> torch.Tensor:
    H, W = model.patch_embed.img_size
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def onnx_ops(path) -> collections.Counter:
    """op types over the graph and every If branch"""
    ops: collections.Counter = collections.Counter()
    todo = [onnx.load(str(path)).graph]
    while todo:
        g = todo.pop()
        for n in g.node:
            ops[n.op_type] += 1
            todo += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return ops


@pytest.mark.parametrize("top_k", [1, 2])
def test_eager_switch_matches_gather(top_k):
    model = tiny_moe(top_k)
    switched = switch_experts(model)
    assert sum(isinstance(m, ExpertSwitch) for m in switched.modules()) == model.num_moe_layers
    x = images(model, 6)
    with torch.no_grad():
        ref = model(x)
        idx = model.forward_with_routing(x)[1].expert_idx
        assert len({tuple(r) for r in idx.tolist()}) > 1  # a mixed batch: the gather fallback
        torch.testing.assert_close(switched(x), ref, atol=1e-5, rtol=0)
        for i in range(x.shape[0]):  # one image: the switch
            torch.testing.assert_close(switched(x[i : i + 1]), ref[i : i + 1], atol=1e-5, rtol=0)
        # the same images forced through every expert: each branch is its own expert
        for e in range(model.num_experts):
            forced = (
                torch.full((1, top_k), e) if top_k == 1 else torch.tensor([[e, (e + 1) % model.num_experts]])
            )
            a = model(x[:1], expert_idx=forced)
            b = switched(x[:1], expert_idx=forced)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_onnx_switch(tmp_path, top_k):
    model = tiny_moe(top_k)
    path, plain = tmp_path / "m.onnx", tmp_path / "gather.onnx"
    export_onnx(model, images(model, 1), path)
    export_onnx(model, images(model, 1), plain, expert_switch=False)
    ops, ops_plain = onnx_ops(path), onnx_ops(plain)
    L, E = model.num_moe_layers, model.num_experts
    # per block: an If for "same experts?", then a tree of E - 1 Ifs per chosen expert
    assert ops["If"] == L * (1 + top_k * (E - 1)) and ops_plain["If"] == 0
    run = OnnxRunner(path)
    x = images(model, 8)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(run(x), ref, atol=1e-4, rtol=0)  # mixed batch
    got = torch.cat([run(x[i : i + 1]) for i in range(x.shape[0])])  # the switch
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def switch_pte() -> tuple[torch.nn.Module, bytes, dict]:
    """tiny_moe(top_k=1) lowered once (fast lowering, the default): the model, the program and its report."""
    model = tiny_moe(top_k=1)
    buf, report = lower_pte(model, images(model, 1))
    return model, buf, report


def test_pte_switch(tmp_path, switch_pte):
    model, buf, report = switch_pte
    x = images(model, 1)
    assert report["expert_dispatch"] == "switch" and "aten_index_select_default" not in report["portable_ops"]
    L, E = model.num_moe_layers, model.num_experts
    assert report["portable_ops"]["cond"] == L * (E - 1)
    path = tmp_path / "m.pte"
    path.write_bytes(buf)
    xs = images(model, 24)
    with torch.no_grad():
        ref, routing = model.forward_with_routing(xs)
    assert set(routing.expert_idx.flatten().tolist()) == set(range(E))  # every branch ran
    torch.testing.assert_close(PteRunner(path)(xs), ref, atol=1e-4, rtol=0)
    gather = lower_pte(model, x, expert_switch=False)
    assert gather[1]["expert_dispatch"] == "gather" and len(buf) < 1.1 * len(gather[0])  # weights stored once
    # the switch survives export's error paths: a batch of 2 cannot take lowered experts
    with pytest.raises(ValueError, match="batch 2"):
        lower_pte(model, images(model, 2))


def test_pte_top2_keeps_gather(tmp_path):
    """K=2 through two sibling conds came out wrong from executorch 1.5 (executorch#21490): gather instead."""
    model = tiny_moe(top_k=2)
    buf, report = lower_pte(model, images(model, 1))
    assert report["expert_dispatch"] == "gather" and "21490" in report["expert_dispatch_reason"]
    path = tmp_path / "m.pte"
    path.write_bytes(buf)
    xs = images(model, 4)
    with torch.no_grad():
        torch.testing.assert_close(PteRunner(path)(xs), model(xs), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fast_lowering_gives_the_same_program(switch_pte):
    """export/delegates.py (experts lowered from one template, lowered modules traced with a cache) changes the
    cost of lowering, not its result: the .pte is byte for byte ExecuTorch's plain path's."""
    model, fast, fast_report = switch_pte
    plain, plain_report = lower_pte(model, images(model, 1), fast_lowering=False)
    assert fast_report["expert_dispatch"] == "switch" and fast_report == plain_report
    assert fast == plain


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_experts_from_a_template_are_byte_identical(int8):
    """ExpertLowering hands each expert's (int8: its own quantised) weights to the first expert's lowered
    program: the delegates are byte for byte those of lowering every expert alone."""
    from mobile_vmoe.export.delegates import ExpertLowering

    torch.manual_seed(0)
    mlp = next(m for m in tiny_moe(top_k=1).modules() if isinstance(m, ExpertMlp))
    shape = (1, 17, mlp.fc1_weight.shape[1])
    int8_mlps = [mlp] if int8 else []
    fast = ExpertLowering(reuse=True, int8=int8_mlps)(mlp, shape)
    plain = ExpertLowering(reuse=False, int8=int8_mlps)(mlp, shape)
    assert len(fast) == len(plain) == mlp.num_experts
    assert [f.processed_bytes for f in fast] == [p.processed_bytes for p in plain]
    assert len({f.processed_bytes for f in fast}) == mlp.num_experts  # each expert kept its own weights
