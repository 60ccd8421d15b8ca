import subprocess
import sys

import pytest
import timm
import torch

import mobile_vmoe.models  # noqa: F401
from mobile_vmoe.checkpoint import ModelMeta, load_model, save_model
from mobile_vmoe.common import UserError
from mobile_vmoe.models import init_from, profile_model, upcycle_dense_state_dict
from mobile_vmoe.preprocess import Preprocess

ALL = sorted(timm.list_models("mobile_v*"))


def _x(model, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *model.pretrained_cfg["input_size"], generator=g)


def test_required_names_and_defaults():
    assert "mobile_vit_tiny_patch16_224" in ALL and "mobile_vmoe_tiny_patch16_224" in ALL
    m = timm.create_model("mobile_vmoe_tiny_patch16_224", num_classes=7)
    assert (m.num_experts, m.top_k, m.num_moe_layers, m.num_classes) == (10, 1, 2, 7)
    assert m.moe_blocks[0].mlp.fc1_weight.shape == (10, 192, 768)  # stacked [E, in, out]
    assert len(m.blocks) == 10 and len(m.moe_blocks) == 2
    d = timm.create_model("mobile_vit_tiny_patch16_224", num_classes=7)
    assert not d.is_moe and len(d.blocks) == 12


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_export(name):
    kw = {"num_classes": 5}
    if "vmoe" in name:
        kw["top_k"] = 2  # exercises the K>1 path too
    m = timm.create_model(name, **kw)
    x = _x(m, b=3)
    m.train()
    out = m(x)
    assert out.shape == (3, 5)
    out.sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3])
    m.eval()
    ep = torch.export.export(m, (_x(m),))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(_x(m, seed=1)), m(_x(m, seed=1)), atol=1e-5, rtol=1e-5)


def test_tiny_flops_and_params_against_dense():
    dense = profile_model(timm.create_model("mobile_vit_tiny_patch16_224"))
    moe = profile_model(timm.create_model("mobile_vmoe_tiny_patch16_224", num_experts=10, top_k=1))
    assert abs(moe.flops / dense.flops - 1) < 0.02
    assert moe.params >= 1.8 * dense.params
    assert abs(moe.active_params / dense.active_params - 1) < 0.01


def test_flops_independent_of_num_experts():
    f4 = profile_model(timm.create_model("mobile_vmoe_mini_patch4_32", num_experts=4)).flops
    f16 = profile_model(timm.create_model("mobile_vmoe_mini_patch4_32", num_experts=16)).flops
    assert abs(f16 / f4 - 1) < 0.01


@pytest.mark.parametrize("dispatch", ["gather", "grouped"])
def test_only_chosen_expert_matters(dispatch):
    torch.manual_seed(0)
    m = timm.create_model("mobile_vmoe_nano_patch4_32", num_experts=4, moe_dispatch=dispatch).eval()
    x = _x(m)
    with torch.no_grad():
        _, routing = m.forward_with_routing(x)
        chosen = int(routing.expert_idx[0, 0])
        other = (chosen + 1) % 4
        ref = m(x)
        m.moe_blocks[-1].mlp.fc1_weight[other].normal_()
        torch.testing.assert_close(m(x), ref, atol=0, rtol=0)
        m.moe_blocks[-1].mlp.fc1_weight[chosen].normal_()
        assert (m(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("dispatch", ["gather", "grouped"])
def test_image_alone_equals_image_in_mixed_batch(dispatch):
    torch.manual_seed(0)
    m = timm.create_model("mobile_vmoe_nano_patch4_32", num_experts=4, top_k=2, moe_dispatch=dispatch).eval()
    x = _x(m, b=8)
    forced = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0], [1, 2], [2, 0], [3, 1]])
    with torch.no_grad():
        batch = m(x, expert_idx=forced)
        alone = torch.cat([m(x[i : i + 1], expert_idx=forced[i : i + 1]) for i in range(8)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        # and the router, left to itself, spreads these images over more than one expert
        _, r = m.forward_with_routing(x)
        torch.testing.assert_close(m(x), torch.cat([m(x[i : i + 1]) for i in range(8)]), atol=1e-5, rtol=1e-5)
    assert r.logits.shape == (8, 4) and r.expert_idx.shape == (8, 2)


@pytest.mark.parametrize("top_k", [1, 2])  # K=1 has its own gather path (the gate scales the output)
def test_gather_and_grouped_agree_with_gradients(top_k):
    torch.manual_seed(0)
    a = timm.create_model("mobile_vmoe_nano_patch4_32", num_experts=4, top_k=top_k, moe_dispatch="gather")
    b = timm.create_model("mobile_vmoe_nano_patch4_32", num_experts=4, top_k=top_k, moe_dispatch="grouped")
    b.load_state_dict(a.state_dict())
    x = _x(a, b=6)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-4)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    ga = a.moe_blocks[0].mlp.fc1_weight.grad
    gb = b.moe_blocks[0].mlp.fc1_weight.grad
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.router.proj.weight.grad, b.router.proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_upcycling_reproduces_dense_model():
    torch.manual_seed(0)
    dense = timm.create_model("mobile_vit_nano_patch4_32", num_classes=10).eval()
    moe = timm.create_model("mobile_vmoe_nano_patch4_32", num_classes=10, num_experts=3).eval()
    missing = upcycle_dense_state_dict(moe, dense.state_dict())
    assert all(m.startswith("router.") for m in missing)
    x = _x(dense, b=4)
    with torch.no_grad():
        # every expert is the dense MLP; with renormalised gates (K=1 -> gate 1) the MoE is the dense model
        assert torch.equal(moe.moe_blocks[-1].mlp.fc1_weight[2], dense.blocks[-1].mlp.fc1.weight.t())
        moe.router.renormalize = True
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def test_router_options_and_bad_args():
    m = timm.create_model("mobile_vmoe_nano_patch4_32", router_summary="cls", renormalize_gates=True, top_k=2)
    _, r = m.eval().forward_with_routing(_x(m, b=2))
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="top_k"):
        timm.create_model("mobile_vmoe_nano_patch4_32", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_moe_layers"):
        timm.create_model("mobile_vmoe_nano_patch4_32", num_moe_layers=13)
    with pytest.raises(ValueError, match="summary"):
        timm.create_model("mobile_vmoe_nano_patch4_32", router_summary="max")


def test_no_weight_decay_covers_expert_biases():
    m = timm.create_model("mobile_vmoe_nano_patch4_32")
    nwd = m.no_weight_decay()
    assert "moe_blocks.0.mlp.fc1_bias" in nwd and "moe_blocks.1.mlp.fc2_bias" in nwd


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = timm.create_model("mobile_vmoe_nano_patch4_32", num_classes=3, num_experts=2).eval()
    meta = ModelMeta(
        "mobile_vmoe_nano_patch4_32",
        {"num_classes": 3, "num_experts": 2},
        ["a", "b", "c"],
        Preprocess.for_model(m),
    )
    p = save_model(tmp_path / "m.safetensors", m, meta)
    m2, meta2 = load_model(p)
    x = _x(m, b=2)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))
    assert meta2.class_names == ["a", "b", "c"]
    with pytest.raises(UserError, match="expected a dense"):
        load_model(p, expect_moe=False)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")
    assert [f.name for f in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp"))


def test_cli_models_table():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobile_vmoe.cli",
            "models",
            "mobile_vit_tiny_patch16_224",
            "mobile_vmoe_tiny_patch16_224",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 4
    dense, moe = lines[2].split("|"), lines[3].split("|")
    assert float(moe[4]) > 1.8 * float(dense[4])  # total params
    assert abs(float(moe[6]) / float(dense[6]) - 1) < 0.02  # GFLOPs
    assert "MoE E=10 K=1 L=2" in lines[3]


# init_from: weights the user has, into a fresh model


def _save_state(path, model):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_init_from_dense_into_dense_and_run_dir(tmp_path):
    src = timm.create_model("mobile_vit_nano_patch8_32", num_classes=4).eval()
    meta = ModelMeta(
        "mobile_vit_nano_patch8_32", {"num_classes": 4}, ["a", "b", "c", "d"], Preprocess.for_model(src)
    )
    save_model(tmp_path / "model.safetensors", src, meta)
    for path in (tmp_path, tmp_path / "model.safetensors"):  # a run directory, the model file
        m = timm.create_model("mobile_vit_nano_patch8_32", num_classes=4).eval()
        assert init_from(m, path) == []
        with torch.no_grad():
            torch.testing.assert_close(m(_x(m)), src(_x(m)), atol=0, rtol=0)


def test_init_from_upcycles_dense_into_moe(tmp_path):
    dense = timm.create_model("mobile_vit_nano_patch8_32", num_classes=4)
    path = _save_state(tmp_path / "dense.safetensors", dense)
    moe = timm.create_model("mobile_vmoe_nano_patch8_32", num_classes=4, num_experts=3)
    fresh_router = moe.router.proj.weight.detach().clone()
    fresh = init_from(moe, path)
    assert sorted(fresh) == [
        "router.norm.bias",
        "router.norm.weight",
        "router.proj.bias",
        "router.proj.weight",
    ]
    assert torch.equal(moe.router.proj.weight, fresh_router)
    for j, i in enumerate((10, 11)):
        mlp, d = moe.moe_blocks[j].mlp, dense.blocks[i].mlp
        for e in range(3):
            assert torch.equal(mlp.fc1_weight[e], d.fc1.weight.t()) and torch.equal(
                mlp.fc2_bias[e], d.fc2.bias
            )
        assert torch.equal(moe.moe_blocks[j].attn.qkv.weight, dense.blocks[i].attn.qkv.weight)
    # MoE weights into a MoE: loaded as they are, nothing left fresh
    again = timm.create_model("mobile_vmoe_nano_patch8_32", num_classes=4, num_experts=3)
    assert init_from(again, _save_state(tmp_path / "moe.safetensors", moe)) == []
    assert torch.equal(again.router.proj.weight, moe.router.proj.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_init_from_timm_vit_state_dict(tmp_path, suffix):
    # timm's own ViT with the nano shape: its key names are the dense model's
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, num_heads=2, num_classes=100
    )
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": vit.state_dict()}, path)
    else:
        _save_state(path, vit)
    moe = timm.create_model("mobile_vmoe_nano_patch8_32", num_experts=2)
    assert all(k.startswith("router.") for k in init_from(moe, path))
    assert torch.equal(moe.moe_blocks[1].mlp.fc1_weight[1], vit.blocks[11].mlp.fc1.weight.t())
    dense = timm.create_model("mobile_vit_nano_patch8_32").eval()
    assert init_from(dense, path) == []
    with torch.no_grad():
        torch.testing.assert_close(dense(_x(dense)), vit.eval()(_x(dense)), atol=0, rtol=0)


def test_init_from_mismatch_and_head_errors(tmp_path):
    micro = _save_state(tmp_path / "micro.safetensors", timm.create_model("mobile_vit_micro_patch8_32"))
    m = timm.create_model("mobile_vit_nano_patch8_32")
    with pytest.raises(UserError) as e:
        init_from(m, micro)
    msg = str(e.value)
    assert (
        "micro.safetensors" in msg
        and "shape mismatches (file vs model): " in msg
        and "blocks.0.attn.qkv.weight (288, 96) vs (192, 64)" in msg
    )
    moe_file = _save_state(tmp_path / "moe.safetensors", timm.create_model("mobile_vmoe_nano_patch8_32"))
    with pytest.raises(UserError) as e:  # MoE weights have no dense MLP for the last blocks
        init_from(m, moe_file)
    msg = str(e.value)
    assert "24 missing: blocks.10.norm1.weight" in msg and "28 unexpected: moe_blocks.0." in msg
    ten = _save_state(
        tmp_path / "ten.safetensors", timm.create_model("mobile_vit_nano_patch8_32", num_classes=10)
    )
    with pytest.raises(
        UserError, match="classifier head has 10 classes, the model 100; pass reset_head=True"
    ):
        init_from(m, ten)
    assert init_from(m, ten, reset_head=True) == ["head.weight", "head.bias"]
    with pytest.raises(UserError, match="not found"):
        init_from(m, tmp_path / "nope.safetensors")
