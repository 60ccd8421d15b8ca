"""timm's model contract, checked on every model family: add a family's names to MODELS to cover it.

Each test builds tiny models (nano width; 32 px, and 224 px where the size matters).
"""

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import create_feature_extractor, get_graph_node_names
from timm.optim import create_optimizer_v2, param_groups_layer_decay

import mobile_vmoe.models  # noqa: F401  (registers the models)
from mobile_vmoe.checkpoint import ModelMeta, save_model
from mobile_vmoe.preprocess import Preprocess

# One dense, one per-image and one per-token MoE model per resolution; a new family adds its names here.
MODELS = [
    "mobile_vit_nano_patch8_32",
    "mobile_vmoe_nano_patch8_32",
    "mobile_vit_nano_patch16_224",
    "mobile_vmoe_nano_patch16_224",
    "mobile_vmoe_token_nano_patch8_32",
    "mobile_vmoe_token_nano_patch16_224",
]
SMALL = [n for n in MODELS if n.endswith("_32")]  # for the tests whose cost grows with the tokens
ALL = sorted(timm.list_models("mobile_v*"))
MOE_KW = {"num_experts": 4, "top_k": 2}  # K > 1 and a small E: both gather forms, several experts used


def _create(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if "vmoe" in name:
        kw = {**MOE_KW, **kw}
    return timm.create_model(name, **kw)


def _x(model: torch.nn.Module, b: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *model.pretrained_cfg["input_size"], generator=g)


def _blocks(model: torch.nn.Module) -> list[str]:
    return [f["module"] for f in model.feature_info]


def _is_moe(model: torch.nn.Module) -> bool:
    return any(n.startswith("moe_blocks.") for n in _blocks(model))


def test_every_registered_model_builds_on_meta():
    assert len(ALL) >= 20
    for name in ALL:
        m = timm.create_model(name, device="meta")
        tensors = list(m.parameters()) + list(m.buffers())
        assert tensors and all(t.device.type == "meta" for t in tensors), name
        assert m.pretrained_cfg["fixed_input_size"] is True, name


@pytest.mark.parametrize("name", MODELS)
def test_device_and_dtype_reach_every_tensor(name):
    m = _create(name, dtype=torch.bfloat16)
    assert {t.dtype for t in [*m.parameters(), *m.buffers()]} == {torch.bfloat16}
    x = _x(m, b=2).bfloat16()
    m.eval()
    with torch.no_grad():
        assert m(x).dtype == torch.bfloat16
    m.train()
    m(x).float().sum().backward()  # the training dispatch in bf16 too
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in m.parameters())
    meta = _create(name, device="meta")
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    for train in (False, True):  # gather with and without gradients: the meta device has no expert counts
        assert meta.train(train)(x.float().to("meta")).shape == (2, meta.num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    cfg = _create(name, device="meta").pretrained_cfg
    assert cfg["fixed_input_size"] is True
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
    assert cfg["input_size"][-1] == (224 if name.endswith("_224") else 32)


@pytest.mark.parametrize("name", MODELS)
def test_eval_with_gradients_equals_no_grad(name):
    m = _create(name).eval()
    x = _x(m)
    with torch.no_grad():
        ref = m(x)
    out = m(x)  # gradients on: a MoE groups the images by expert
    assert out.requires_grad
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_torchscript_equals_eager(name):
    m = _create(name).eval()
    scripted = torch.jit.script(m)
    x = _x(m)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), m(x))
        if _is_moe(m):
            forced = torch.tensor([[0, 1], [2, 3], [3, 0]])
            torch.testing.assert_close(scripted(x, forced), m(x, forced))
    with torch.enable_grad():  # the grouped dispatch is scriptable too
        torch.testing.assert_close(scripted(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_fx_symbolic_trace_then_torchscript(name):
    m = _create(name).eval()
    gm = torch.fx.symbolic_trace(m)
    x = _x(m)
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.script(gm)(x), ref, atol=1e-5, rtol=1e-5)
        if _is_moe(m):  # the optional argument is decided when the graph runs, not when it is traced
            forced = torch.tensor([[0, 1], [2, 3], [3, 0]])
            torch.testing.assert_close(gm(x, forced), m(x, forced), atol=1e-5, rtol=1e-5)
    gm.train()
    gm(x).sum().backward()
    assert all(p.grad is not None for p in gm.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_timm_fx_feature_extraction(name):
    m = _create(name)
    blocks = _blocks(m)
    train_nodes, eval_nodes = get_graph_node_names(m)
    if _is_moe(m):  # leaf modules: one node each, not their insides
        assert "router" in eval_nodes and "moe_blocks.0.mlp" in eval_nodes
        assert not any(n.startswith(("router.", "moe_blocks.0.mlp.")) for n in eval_nodes)
    fe = create_feature_extractor(m, blocks)
    x = _x(m)
    m.eval()
    fe.eval()
    with torch.no_grad():
        feats = fe(x)
        ref = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    assert list(feats) == blocks
    for (patches, prefix), got in zip(ref, feats.values(), strict=True):
        torch.testing.assert_close(got, torch.cat([prefix, patches], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(fe)(x)[blocks[-1]], feats[blocks[-1]])
    fe.train()
    fe(x)[blocks[-1]].square().sum().backward()
    grads = dict(fe.named_parameters())
    assert all(p.grad is not None for n, p in grads.items() if n.startswith(("blocks.", "moe_blocks.")))
    if _is_moe(m):
        assert grads["router.proj.weight"].grad.abs().sum() > 0  # through the gates


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_cover_every_block_in_order(name):
    m = _create(name).eval()
    blocks = _blocks(m)
    assert len(blocks) == 12 and blocks == [n for n, _ in m.named_modules() if n in set(blocks)]
    seen = {}
    hooks = [
        m.get_submodule(b).register_forward_hook(lambda mod, a, out, b=b: seen.__setitem__(b, out))
        for b in blocks
    ]
    x = _x(m, b=2)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, m.forward_features(x))
    for h in hooks:
        h.remove()
    assert len(inter) == len(blocks)
    for b, y in zip(blocks, inter, strict=True):
        torch.testing.assert_close(y, seen[b][:, m.num_prefix_tokens :])

    # pruning keeps exactly the blocks up to the last index taken, the MoE blocks included
    for idx in ([4], [len(blocks) - 2]):
        pruned = copy.deepcopy(m)
        assert pruned.prune_intermediate_layers(idx) == idx
        kept = dict(pruned.named_modules())
        assert [b for b in blocks if b in kept] == blocks[: idx[0] + 1]
        with torch.no_grad():
            got = pruned.forward_intermediates(x, indices=idx, intermediates_only=True)
            want = m.forward_intermediates(x, indices=idx, intermediates_only=True)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    full = _create(name).eval()
    fo = _create(name, features_only=True, out_indices=(-4, -2, -1)).eval()
    assert fo.feature_info.module_name() == [_blocks(full)[i] for i in (8, 10, 11)]
    fo.model.load_state_dict(full.state_dict(), strict=False)  # the head is pruned away
    x = _x(full, b=2)
    with torch.no_grad():
        got = fo(x)
        want = full.forward_intermediates(x, indices=[8, 10, 11], intermediates_only=True)
    side = 32 // 8 if name.endswith("_32") else 224 // 16
    assert [tuple(t.shape) for t in got] == [(2, full.embed_dim, side, side)] * 3
    torch.testing.assert_close(got, want)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)  # the same router noise in every run (per-token models train with noisy routing)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return total


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_saves_memory(name):
    m = _create(name).train()
    x = _x(m, b=4)
    plain = _saved_bytes(lambda: m(x))
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    ckpt = _saved_bytes(lambda: m(x))
    print(f"{name}: saved for backward {plain / 1e6:.2f} MB -> {ckpt / 1e6:.2f} MB with checkpointing")
    assert ckpt < 0.5 * plain
    for n, p in m.named_parameters():  # the same gradients, the router's and the experts' included
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
    # forward_intermediates checkpoints too
    m.zero_grad()
    ckpt_inter = _saved_bytes(lambda: m.forward_intermediates(x)[0])
    m.set_grad_checkpointing(False)
    m.zero_grad()
    assert ckpt_inter < 0.5 * _saved_bytes(lambda: m.forward_intermediates(x)[0])


@pytest.mark.parametrize("name", MODELS)
def test_layer_decay_scales_follow_block_depth(name):
    m = _create(name, device="meta")
    decay = 0.75
    scale = {}
    for g in param_groups_layer_decay(m, layer_decay=decay):
        for p in g["params"]:
            scale[p] = g["lr_scale"]
    by_name = {n: scale[p] for n, p in m.named_parameters()}
    blocks = _blocks(m)
    N = len(blocks)
    for i, b in enumerate(blocks):  # layer 0 is the stem, block i is layer i + 1, the head layer N + 1
        got = [s for n, s in by_name.items() if n.startswith(b + ".")]
        assert got and got == pytest.approx([decay ** (N - i)] * len(got)), b
    assert by_name["patch_embed.proj.weight"] == pytest.approx(decay ** (N + 1))
    assert by_name["head.weight"] == 1.0 and by_name["norm.weight"] == pytest.approx(decay)
    if getattr(m, "router", None) is not None:  # with the first MoE block, whose gates it makes
        first_moe = blocks.index("moe_blocks.0")
        got = [s for n, s in by_name.items() if n.startswith("router.")]
        assert got and got == pytest.approx([decay ** (N - first_moe)] * len(got))
    opt = create_optimizer_v2(_create(name), "adamw", lr=1e-3, layer_decay=decay)
    assert sorted({round(g["lr_scale"], 6) for g in opt.param_groups}) == sorted(
        {round(decay**k, 6) for k in range(N + 2)}
    )


@pytest.mark.parametrize("name", SMALL)
def test_pretrained_from_local_file(name, tmp_path):
    src = _create(name).eval()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    plain = tmp_path / "weights.safetensors"
    save_file(state, str(plain))
    kw = MOE_KW if "vmoe" in name else {}
    model_file = save_model(
        tmp_path / "model.safetensors", src, ModelMeta(name, kw, [], Preprocess.for_model(src))
    )
    x = _x(src)
    for path in (plain, model_file):
        m = _create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(x), src(x), atol=0, rtol=0)
    # a different number of classes keeps everything but the head, as for timm's models
    m = _create(name, pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(plain)))
    torch.testing.assert_close(m.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert m.head.out_features == 7
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model(name, pretrained=True)


def test_pretrained_dense_file_upcycles_into_moe(tmp_path):
    dense = _create("mobile_vit_nano_patch8_32")
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    moe = _create("mobile_vmoe_nano_patch8_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for e in range(MOE_KW["num_experts"]):
        torch.testing.assert_close(moe.moe_blocks[1].mlp.fc2_weight[e], dense.blocks[11].mlp.fc2.weight.t())
    torch.testing.assert_close(moe.moe_blocks[0].attn.qkv.weight, dense.blocks[10].attn.qkv.weight)
