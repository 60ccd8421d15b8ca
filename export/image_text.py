"""Export forms of an image-text model (LIMoE, dense one-tower, two-tower CLIP): what a phone runs of it.

* ``--part image`` (default): a zero-shot classifier. The image path of the tower, and the class-prompt embeddings
  of the checkpoint (``prompts.class_embeddings``: every class name in every prompt template, the templates
  averaged; what zero-shot evaluation uses) baked in as a constant [C, P]: image [1, 3, H, W] -> logits [1, C] =
  logit_scale * cosine. It runs, verifies and benchmarks exactly like a classifier.
* ``--part text``: the text path alone, for open-vocabulary use: tokens [1, L] int64 (``mobile_vmoe.text``'s
  tokenizer, open_clip's CLIP BPE) -> the L2-normalised text embedding [1, P]. An app compares it with image
  embeddings, or builds its own class embeddings with it.

A MoE's layers take the per-token export form of ``token.py`` (the same class as the per-token V-MoE's). Text
exports are verified on tokenised prompts and captions: embeddings within the tolerance, and each exported
embedding retrieves its own eager one among all of them (the "top-1 agreement" of a text encoder).
Shape letters as in ``mobile_vmoe.models.limoe``: C classes, P joint embedding width, L context length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mobile_vmoe.captions import CaptionSet
from mobile_vmoe.checkpoint import ModelMeta
from mobile_vmoe.common import UserError
from mobile_vmoe.files.captions import DEFAULT_TEMPLATES
from mobile_vmoe.files.sidecar import Sidecar, TextInput
from mobile_vmoe.prompts import class_embeddings
from mobile_vmoe.text import PAD_ID, SAMPLE_CAPTIONS, Tokenizer

from .verify import Images, Thresholds, parity

__all__ = [
    "PARTS",
    "ImageTextPart",
    "RANDOM_CLASSES",
    "TOKENIZER_NAME",
    "TextEncoder",
    "ZeroShotClassifier",
    "caption_images",
    "dense_twin",
    "describe_part",
    "export_part",
    "is_image_text",
    "text_input",
    "text_parity",
    "verification_tokens",
]

PARTS = ("image", "text")
# open_clip's SimpleTokenizer (``mobile_vmoe.text.Tokenizer``): CLIP's lower-cased byte-level BPE, 49408 ids
TOKENIZER_NAME = "openai-clip-bpe"
RANDOM_CLASSES = 10  # placeholder classes of a random-weight zero-shot classifier (latency only)


def is_image_text(model: nn.Module) -> bool:
    return bool(getattr(model, "is_image_text", False))


class ImageTextPart(nn.Module):
    """One path of an ``ImageTextTransformer``; the MoE attributes export reads are the model's."""

    is_image_text = False  # the export form is a plain one-input model

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def is_moe(self) -> bool:
        return bool(self.model.is_moe)

    @property
    def moe_routing(self) -> str | None:
        return self.model.moe_routing

    @property
    def num_experts(self) -> int:
        return int(self.model.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.model.top_k)

    @property
    def num_moe_layers(self) -> int:
        return int(self.model.num_moe_layers)

    @property
    def moe_indices(self) -> list[int]:
        return list(self.model.moe_indices)

    def moe_mlps(self) -> list[nn.Module]:
        return self.model.moe_mlps()

    def set_routing(
        self, capacity_ratio: float | None = None, bpr: bool | None = None, cls_first: bool | None = None
    ) -> None:
        self.model.set_routing(capacity_ratio=capacity_ratio, bpr=bpr, cls_first=cls_first)


class ZeroShotClassifier(ImageTextPart):
    """images [B, 3, H, W] -> logits [B, C] = logit_scale * image embedding . class embedding (both normalised).

    ``class_embeds`` [C, P] and the temperature are constants of the export (buffers)."""

    def __init__(self, model: nn.Module, class_embeds: torch.Tensor) -> None:
        super().__init__(model)
        self.register_buffer("class_embeds", class_embeds.detach().float().clone())
        self.register_buffer("logit_scale", model.scale().detach().float().reshape(()))
        self.num_classes = int(class_embeds.shape[0])
        self.input_shape = [1, 3, *(int(s) for s in model.patch_embed.img_size)]

    @property
    def patch_embed(self) -> nn.Module:
        """The model's (export and Core ML read its image size)."""
        return self.model.patch_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # a linear with constant weights, not ``@ class_embeds.t()``: XNNPACK takes it (a matmul runs portable)
        return F.linear(self.model.encode_image(images), self.class_embeds) * self.logit_scale


class TextEncoder(ImageTextPart):
    """tokens [B, L] int64 (``Tokenizer``, padded with 0) -> text embeddings [B, P], L2-normalised."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.input_shape = [1, int(model.context_length)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def export_part(
    model: nn.Module, meta: ModelMeta, part: str | None, random_weights: bool, where: str | os.PathLike[str]
) -> nn.Module:
    """The export form of ``part`` ("image": the zero-shot classifier, default; "text": the text encoder).

    UserError, before any lowering, for a part of a model that is not image-text, or a zero-shot classifier of a
    checkpoint without class names or prompt templates. A random-weight model (``--model``) gets
    ``RANDOM_CLASSES`` placeholder classes (``meta`` is filled in: the sidecar records them).
    """
    if not is_image_text(model):
        if part not in (None, "image"):
            raise UserError(
                f"--part {part}: {meta.model} is an image classifier; --part applies to image-text models "
                "(mobile_limoe_*, mobile_onetower_*, mobile_clip_*)"
            )
        return model
    if part not in (None, *PARTS):
        raise UserError(f"--part {part!r}: expected one of {', '.join(PARTS)}")
    if part == "text":
        return TextEncoder(model).eval()
    if random_weights and not meta.class_names:
        meta.class_names = [f"class {i}" for i in range(RANDOM_CLASSES)]
        meta.prompt_templates = list(DEFAULT_TEMPLATES)
    missing = [f for f in ("class_names", "prompt_templates") if not getattr(meta, f)]
    if missing:
        raise UserError(
            f"{where}: an image-text checkpoint exports as a zero-shot classifier from its metadata "
            f"{' and '.join(missing)}, which it lacks (a checkpoint trained on a caption set with classes.json "
            "has them); export the text encoder with --part text instead"
        )
    return ZeroShotClassifier(model, class_embeddings(model, meta.class_names, meta.prompt_templates)).eval()


def text_input(model: nn.Module) -> TextInput:
    """What the sidecar tells an app about the text input of an image-text model."""
    tok = Tokenizer(int(model.context_length))
    return TextInput(
        tokenizer=TOKENIZER_NAME,
        context_length=tok.context_length,
        pad_id=PAD_ID,
        sot_id=int(tok.sot_id),
        eot_id=int(tok.eot_id),
        vocab_size=int(model.vocab_size),
    )


def _caption_set(meta: ModelMeta, data: str | os.PathLike[str] | None) -> CaptionSet | None:
    """The caption set ``data`` names, else the one the checkpoint was trained on (its val split where it has
    one); None where neither is a caption set (images then come from ``verify.load_images``)."""
    from mobile_vmoe.captions import caption_splits, is_caption_source, read_caption_set

    source = data if data is not None else meta.train.data_dir
    if source is None or not is_caption_source(str(source)):
        return None
    if data is None and not Path(source).exists():
        raise UserError(
            f"checkpoint metadata names data_dir {source}, which does not exist here; pass --data"
        )
    split = caption_splits(source)[-1]  # val after train
    return read_caption_set(split, verify_images=False)  # images unreadable here are skipped when loaded


def caption_images(meta: ModelMeta, data: str | os.PathLike[str] | None, num: int) -> Images | None:
    """Up to ``num`` distinct images of the caption set (``_caption_set``), preprocessed as the checkpoint says."""
    from PIL import Image, UnidentifiedImageError

    captions = _caption_set(meta, data)
    if captions is None:
        return None
    refs = list(dict.fromkeys(r.image for r in captions.rows))
    tf, xs = meta.preprocess.transform(), []
    for ref in refs[:: max(1, len(refs) // num)][:num]:  # spread over the set
        try:
            with ref.open() as fh, Image.open(fh) as im:
                xs.append(tf(im.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError):
            continue
    if not xs:
        raise UserError(f"{captions.source}: no readable images to verify the export on")
    return Images(verify=torch.stack(xs), calibrate=[], tune=torch.empty(0),
                  source={"caption_set": str(captions.source), "num_images": len(xs)})  # fmt: skip


def verification_tokens(
    meta: ModelMeta, context_length: int, num: int, data: str | os.PathLike[str] | None = None
) -> Images:
    """Up to ``num`` distinct texts, tokenised: the checkpoint's zero-shot prompts, the captions of its caption
    set (``_caption_set``), then ``SAMPLE_CAPTIONS``; as ``verify.Images`` with the tokens [N, L] in ``verify``."""
    prompts = [t.format(c) for c in meta.class_names for t in meta.prompt_templates]
    captions = _caption_set(meta, data)
    real = captions.captions[: 4 * num] if captions is not None else []
    texts = list(dict.fromkeys([*prompts, *real, *SAMPLE_CAPTIONS]))[:num]
    batch = Tokenizer(context_length)(texts)
    source = {"texts": "zero-shot prompts, then captions" + (f" of {captions.source}" if captions else ""),
              "num_prompts": min(len(prompts), num), "truncated": batch.truncated}  # fmt: skip
    return Images(verify=batch.tokens, calibrate=[], tune=torch.empty(0), source=source)


def text_parity(ref: torch.Tensor, out: torch.Tensor, thr: Thresholds) -> tuple[dict[str, Any], list[str]]:
    """``verify.parity`` for text embeddings [N, P]: max abs difference, and top-1 agreement as retrieval: the
    share of exported embeddings whose nearest eager embedding (cosine) is their own text's."""
    figures, _ = parity(ref, out, Thresholds(None, None))
    sim = F.normalize(out.float(), dim=-1) @ F.normalize(ref.float(), dim=-1).t()  # [N, N]
    own = torch.arange(ref.shape[0])
    agree = float((sim.argmax(dim=-1) == own).float().mean())
    figures.update(top1_agreement=agree, min_cosine=float(sim[own, own].min()), atol=thr.atol,
                   min_top1_agreement=thr.min_agreement, agreement="text retrieval")  # fmt: skip
    failures = []
    if thr.atol is not None and not figures["max_abs_diff"] <= thr.atol:
        failures.append(f"max abs difference {figures['max_abs_diff']:.3g} > {thr.atol:.3g}")
    if thr.min_agreement is not None and agree < thr.min_agreement:
        failures.append(f"text retrieval agreement {agree:.2%} < {thr.min_agreement:.2%}")
    return figures, failures


def dense_twin(part: nn.Module, model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The same export form of the dense one-tower model of the same size (Core ML's structural reference)."""
    import timm

    moe_only = {"num_experts", "top_k", "moe_every", "capacity_ratio", "eval_capacity_ratio", "bpr", "eval_bpr",
                "noise_std", "group_size", "eval_group_size"}  # fmt: skip
    name = model_name.replace("mobile_limoe_", "mobile_onetower_")
    twin = timm.create_model(name, **{k: v for k, v in kwargs.items() if k not in moe_only}).eval()
    if isinstance(part, ZeroShotClassifier):
        return ZeroShotClassifier(twin, torch.zeros_like(part.class_embeds)).eval()
    return TextEncoder(twin).eval()


def describe_part(net: nn.Module, meta: ModelMeta, sc: Sidecar) -> None:
    """Fill in what the sidecar says of an image-text part: its kind, input and the zero-shot set-up."""
    if not isinstance(net, ImageTextPart):
        return
    sc.embed_dim = int(net.model.embed_dim)
    sc.logit_scale = float(net.model.scale())
    if isinstance(net, TextEncoder):
        sc.kind, sc.input_dtype, sc.text = "text_encoder", "int64", text_input(net.model)
    else:
        sc.kind, sc.prompt_templates = "zero_shot_classifier", list(meta.prompt_templates)
