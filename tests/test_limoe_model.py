"""Image-text models (LIMoE, dense one-tower, two-tower CLIP), the caption tokenizer and the contrastive objective.

Nano models at 32 px (16 image tokens), captions of 16 tokens.
"""

import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

import mobile_vmoe.models  # noqa: F401  (registers the models)
from mobile_vmoe.models import (
    ContrastiveObjective,
    ImageTextOutput,
    ImageTextTransformer,
    flops_per_example,
    global_entropy,
    local_entropy,
)
from mobile_vmoe.models.limoe import IMAGE_TEXT_VARIANTS
from mobile_vmoe.models.token_moe import TokenRouter, buffer_slots
from mobile_vmoe.text import Tokenizer, text_mask

LIMOE, ONETOWER, CLIP = (
    "mobile_limoe_nano_patch8_32",
    "mobile_onetower_nano_patch8_32",
    "mobile_clip_nano_patch8_32",
)
NANO = [LIMOE, ONETOWER, CLIP]
L = 16
CAPTIONS = [
    "a red circle on a blue background",
    "a small green square",
    "three yellow triangles in the upper left corner of a dark image",
    "a cat",
]


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, context_length=L, **kw)


def _batch(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), Tokenizer(L)(CAPTIONS[:b]).tokens


def test_tokenizer_matches_open_clip_and_counts_cut_and_empty_captions():
    tok = Tokenizer(8)
    texts = ["A cat.", "   ", "one two three four five six seven eight nine", "🙂"]
    batch = tok(texts)
    assert torch.equal(batch.tokens, open_clip.tokenize(texts, context_length=8))
    assert (batch.truncated, batch.empty) == (1, 1)  # the emoji is a byte-level BPE token, not empty
    assert batch.tokens[2, -1] == tok.eot_id and (batch.tokens[:, 0] == 49406).all()
    assert text_mask(batch.tokens).sum(dim=1).tolist() == [5, 2, 8, 3]
    assert tok.vocab_size == 49408 and tok.decode(batch.tokens[0]) == "a cat ."
    with pytest.raises(TypeError, match="sequence of captions"):
        tok("a cat")


def _reference_masked_slots(idx, gates, mask, E: int, P: int, bpr: bool) -> torch.Tensor:
    """V-MoE's placement as loops, skipping the masked tokens (no slot: E * P)."""
    G, N, K = idx.shape
    out = torch.full_like(idx, E * P)
    for g in range(G):
        order = sorted(range(N), key=lambda i: -float(gates[g, i, 0])) if bpr else range(N)
        count = [0] * E
        for k in range(K):
            for i in order:
                if mask[g, i]:
                    e = int(idx[g, i, k])
                    out[g, i, k] = e * P + count[e] if count[e] < P else E * P
                    count[e] += 1
    return out


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
def test_masked_tokens_take_no_slot_and_count_in_no_loss(bpr, K):
    g = torch.Generator().manual_seed(0)
    G, N, E, P = 2, 12, 4, 3
    probs = torch.randn(G, N, E, generator=g).softmax(-1)
    gates, idx = probs.topk(K, dim=-1)
    mask = torch.rand(G, N, generator=g) > 0.4
    expected = _reference_masked_slots(idx, gates, mask, E, P, bpr)
    assert torch.equal(buffer_slots(idx, gates, E, P, bpr, mask), expected)
    router = TokenRouter(8, E, top_k=1).train()
    x = torch.randn(1, N, 8, generator=g)
    logits, noisy = router.scores(x)
    keep = mask[:1]
    masked = router.balance_losses(logits, noisy, keep)
    alone = router.balance_losses(logits[keep][None], noisy[keep][None])
    assert torch.allclose(torch.stack(masked), torch.stack(alone), atol=1e-6)


@pytest.mark.parametrize("name", NANO)
def test_outputs_are_normalised_with_the_clip_temperature(name):
    model = _model(name)
    images, tokens = _batch()
    out, routings = model.train().forward_with_routing(images, tokens)
    assert isinstance(out, ImageTextOutput)
    for e in (out.image_embeds, out.text_embeds):
        assert e.shape == (4, model.embed_dim) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert out.logit_scale.ndim == 0 and math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    assert model.is_image_text and model.context_length == L and model.vocab_size == 49408
    assert model.image_size == 32 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    moe = name == LIMOE
    assert model.is_moe == moe and len(routings) == len(model.moe_mlps()) == model.num_moe_layers == (
        6 if moe else 0
    )
    assert model.moe_routing == ("token" if moe else None) and model.num_experts == (8 if moe else 0)


def test_routing_is_joint_and_split_by_modality():
    model = _model(LIMOE, group_size=2)
    images, tokens = _batch()
    _, routings = model.train().forward_with_routing(images, tokens)
    mask = text_mask(tokens)
    r = routings[0]
    mlp = model.moe_mlps()[0]
    joint = mlp.last_routing
    E, P = 8, joint.capacity
    assert P == math.ceil(1.05 * 2 * (16 + L) / E)  # one buffer for the image and text tokens of 2 examples
    assert r.image.slot.shape == (2, 2 * 16, 1) and r.text.slot.shape == (2, 2 * L, 1)
    assert torch.equal(r.text_mask, mask)
    text_slot = r.text.slot.reshape(4, L)
    assert (text_slot[~mask] == E * P).all()  # padding takes no slot
    # image and text tokens share the buffers: no slot is given twice within a group
    both = torch.cat([r.image.slot, r.text.slot], dim=1).reshape(2, -1)
    for g in range(2):
        kept = both[g][both[g] < E * P]
        assert kept.unique().numel() == kept.numel()
    assert (joint.slot.reshape(2, 2, 16 + L)[:, :, :16] == r.image.slot.reshape(2, 2, 16)).all()


def test_padding_changes_neither_text_embeddings_nor_other_tokens_routing():
    model = _model(LIMOE).train()  # training: noise and BPR; one group of 4 examples
    images, tokens = _batch()
    mask = text_mask(tokens)

    def run() -> tuple:
        torch.manual_seed(1)  # the same router noise
        out, routings = model.forward_with_routing(images, tokens)
        return out, routings

    out, routings = run()
    assert any(
        (r.text.slot.reshape(4, L)[mask] == 8 * r.text.capacity).any() for r in routings
    )  # buffers bind
    with torch.no_grad():  # padding tokens now look entirely different to the router
        model.token_embed.weight[0] += 5 * torch.randn(model.width)
    out2, routings2 = run()
    assert torch.equal(out.image_embeds, out2.image_embeds) and torch.equal(out.text_embeds, out2.text_embeds)
    for r, r2 in zip(routings, routings2, strict=True):
        assert torch.equal(r.image.slot, r2.image.slot)
        assert torch.equal(r.text.slot.reshape(4, L)[mask], r2.text.slot.reshape(4, L)[mask])
    # and a caption's embedding does not depend on the context it is padded to (buffers large enough)
    model.eval().set_routing(capacity_ratio=8.0)
    short = model.encode_text(Tokenizer(10)(CAPTIONS[:2]).tokens)  # neither caption cut
    long = model.encode_text(Tokenizer(L)(CAPTIONS[:2]).tokens)
    assert torch.allclose(short, long, atol=1e-5)


@pytest.mark.parametrize("name", NANO)
def test_encoders_equal_the_joint_forward(name):
    model = _model(name).eval()
    # with buffers that never overflow, routing alone or together gives each token the same expert
    model.set_routing(capacity_ratio=8.0)
    images, tokens = _batch()
    with torch.no_grad():
        out = model(images, tokens)
        assert torch.allclose(model.encode_image(images), out.image_embeds, atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), out.text_embeds, atol=1e-5)


def test_bpr_in_training_keeps_the_most_confident_tokens():
    model = _model(LIMOE).train()
    assert all(m.bpr and m.eval_bpr for m in model.moe_mlps())
    images, tokens = _batch()
    model.forward_with_routing(images, tokens)
    token_mask = torch.cat([torch.ones(4, 16, dtype=torch.bool), text_mask(tokens)], dim=1).reshape(1, -1)
    checked = 0
    for mlp in model.moe_mlps():
        r = mlp.last_routing
        E, P = 8, r.capacity
        gate, idx, slot = r.gates[0, :, 0], r.expert_idx[0, :, 0], r.slot[0, :, 0]
        for e in range(E):
            mine = token_mask[0] & (idx == e)
            kept, dropped = mine & (slot < E * P), mine & (slot == E * P)
            if dropped.any():
                assert gate[kept].min() >= gate[dropped].max()
                checked += 1
    assert checked  # some buffer overflowed


def test_entropy_losses_against_hand_computed_values():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    mask = torch.tensor([True, True, False])  # the last token is padding
    assert math.isclose(local_entropy(probs, mask).item(), math.log(2) / 2, rel_tol=1e-6)
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of the mean [0.75, 0.25]
    assert math.isclose(global_entropy(probs, mask, 2).item(), math.log(2) - h_mean, rel_tol=1e-6)
    assert global_entropy(probs, mask, 1.5).item() == 0.0  # H(mean) > log 1.5: the hinge clips
    assert math.isclose(global_entropy(probs, None, 2).item(), 0.0, abs_tol=1e-7)  # mean [0.5, 0.5]
    # the sign: descending the global loss spreads the modality over the experts
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    before = -(logits.softmax(-1).mean(0) * logits.softmax(-1).mean(0).log()).sum()
    global_entropy(logits.softmax(-1), None, 2).backward()
    with torch.no_grad():
        p = (logits - 1.0 * logits.grad).softmax(-1).mean(0)
    assert -(p * p.log()).sum() > before
    with pytest.raises(ValueError, match="num_experts_S"):
        global_entropy(probs, mask, 0.5)


def test_clip_loss_equals_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    loss, parts = ContrastiveObjective()(ImageTextOutput(img, txt, scale), [])
    sim = scale * img @ txt.T  # [images, texts]
    by_image = -sum(sim[i, i] - torch.logsumexp(sim[i], 0) for i in range(3)) / 3
    by_text = -sum(sim[i, i] - torch.logsumexp(sim[:, i], 0) for i in range(3)) / 3
    assert torch.allclose(loss, (by_image + by_text) / 2, atol=1e-6)
    assert parts["contrastive_loss"] == parts["loss"] and parts["logit_scale"] == 10.0


def test_objective_trains_the_router_and_reports_every_part():
    model = _model(LIMOE).train()
    images, tokens = _batch()
    objective = ContrastiveObjective(num_experts=8, global_experts_S=(8, 4))
    loss, parts = objective(*model.forward_with_routing(images, tokens))
    loss.backward()
    for mlp in model.moe_mlps():
        assert mlp.router.proj.weight.grad is not None and mlp.router.proj.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None and model.token_embed.weight.grad.abs().sum() > 0
    for m in ("image", "text"):
        for k in ("local_entropy", "global_entropy", "importance_loss", "load_loss", "dropped"):
            assert parts[f"{m}_{k}"].ndim == 0 and torch.isfinite(parts[f"{m}_{k}"])
        assert 0 < parts[f"{m}_local_entropy"] <= 6 * math.log(8) + 1e-4
    assert loss.item() > parts["contrastive_loss"].item()
    with pytest.raises(ValueError, match="global_experts_S"):
        ContrastiveObjective(num_experts=8, global_experts_S=16)


def test_classic_losses_per_modality_or_joint():
    """V-MoE's importance/load losses balance each modality on its own (default) or all routed tokens together
    (V-MoE's definition: one balance for the group, which the majority modality can satisfy alone)."""
    model = _model(LIMOE).train()
    images, tokens = _batch()
    torch.manual_seed(0)
    out, routings = model.forward_with_routing(images, tokens)
    w = dict(num_experts=8, local_weight=0.0, global_weight=0.0, importance_weight=0.5, load_weight=0.5)
    per, p_parts = ContrastiveObjective(**w)(out, routings)
    joint, j_parts = ContrastiveObjective(**w, classic_losses="joint")(out, routings)
    c = p_parts["contrastive_loss"]
    by_modality = sum(
        p_parts[f"{m}_{k}"] for m in ("image", "text") for k in ("importance_loss", "load_loss")
    )
    assert torch.allclose(per, c + 0.5 * by_modality, atol=1e-5)
    one = j_parts["joint_importance_loss"] + j_parts["joint_load_loss"]
    torch.testing.assert_close(
        one, sum(r.joint.importance_loss + r.joint.load_loss for r in routings).detach()
    )
    assert torch.allclose(joint, c + 0.5 * one, atol=1e-5) and not torch.allclose(joint, per)
    assert "joint_importance_loss" not in p_parts
    with pytest.raises(ValueError, match="classic_losses"):
        ContrastiveObjective(num_experts=8, classic_losses="global")


def test_grad_checkpointing_gives_the_same_gradients():
    images, tokens = _batch()
    grads = []
    for ckpt in (False, True):
        model = _model(LIMOE).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(2)
        loss, _ = ContrastiveObjective(num_experts=8)(*model.forward_with_routing(images, tokens))
        loss.backward()
        grads.append(model.moe_mlps()[-1].router.proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, modality: str) -> None:
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.modality == "image" else self.model.encode_text(x)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_encoders_export_with_static_shapes(modality):
    model = _model(LIMOE).eval()
    images, tokens = _batch(2)
    x = images if modality == "image" else tokens
    enc = _Encoder(model, modality)
    ep = torch.export.export(enc, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), enc(x), atol=1e-5)


def test_meta_and_bfloat16_creation():
    for name in IMAGE_TEXT_VARIANTS:
        m = timm.create_model(name, device="meta")
        assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}, name
        assert m.pretrained_cfg["fixed_input_size"] and m.default_cfg["mean"] == m.pretrained_cfg["mean"]
    model = _model(LIMOE, dtype=torch.bfloat16).train()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    images, tokens = _batch()
    out, routings = model.forward_with_routing(images.bfloat16(), tokens)
    assert out.image_embeds.dtype == torch.bfloat16
    ContrastiveObjective(num_experts=8)(out, routings)[0].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_equal_compute_baselines():
    flops = {name: flops_per_example(_model(name)) for name in NANO}
    assert flops[ONETOWER] == flops[CLIP]  # the same blocks run the same tokens, in one tower or two
    # LIMoE adds routers and buffer slack (5 slots x 8 experts for 32 tokens): under a fifth more
    assert flops[ONETOWER] < flops[LIMOE] < 1.2 * flops[ONETOWER]
    # counted at the size the model was built for, not its name's: 4x the image tokens at 64 px
    assert flops_per_example(_model(ONETOWER, img_size=64)) > 2 * flops[ONETOWER]
    model = _model(ONETOWER)
    params = {n: sum(p.numel() for p in _model(n).parameters()) for n in (ONETOWER, CLIP)}
    assert params[CLIP] - params[ONETOWER] == sum(p.numel() for p in model.blocks.parameters())


def test_bad_input_is_refused():
    model = _model(LIMOE)
    images, tokens = _batch()
    with pytest.raises(ValueError, match="L <= 16"):
        model(images, Tokenizer(32)(CAPTIONS).tokens)
    with pytest.raises(ValueError, match="pair up"):
        model(images[:2], tokens)
    with pytest.raises(ValueError, match="is dense; use mobile_limoe_nano_patch8_32"):
        timm.create_model(CLIP, num_experts=4)
    with pytest.raises(ValueError, match="two_tower models are dense"):
        ImageTextTransformer(two_tower=True, num_experts=4)
    with pytest.raises(ValueError, match="no classifier"):
        timm.create_model(LIMOE, num_classes=10)


def test_class_embeddings_average_the_templates_and_travel_in_the_model_file(tmp_path):
    from mobile_vmoe.checkpoint import ModelMeta, read_meta, save_model
    from mobile_vmoe.preprocess import Preprocess
    from mobile_vmoe.prompts import class_embeddings

    torch.manual_seed(0)
    m = timm.create_model(LIMOE, context_length=16).eval()
    names, templates = ["red disk", "blue square"], ["a photo of the {}.", "a picture of one {}."]
    got = class_embeddings(m, names, templates)
    tok = Tokenizer(16)
    each = torch.stack([m.encode_text(tok([t.format(n) for t in templates]).tokens).mean(0) for n in names])
    assert got.shape == (2, m.embed_dim) and torch.allclose(got, F.normalize(each, dim=-1), atol=1e-5)
    meta = ModelMeta(
        LIMOE, {"context_length": 16}, names, Preprocess.for_model(m), prompt_templates=templates
    )
    back = read_meta(save_model(tmp_path / "m.safetensors", m, meta))
    assert back.prompt_templates == templates and back.class_names == names
