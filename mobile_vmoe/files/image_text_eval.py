"""The image-text evaluation result (``mobile-vmoe eval --checkpoint RUN --json OUT`` on an image-text model).

One JSON object (docs/FILES.md), ``"format": "mobile-vmoe-image-text-eval/1"``:

- ``zero_shot``: top-1 / top-5 of the labelled evaluation images against the class-name prompts (templates
  averaged, ``prompts.class_embeddings``); null when the caption set has no labels or no class names.
- ``retrieval``: recall@1 / recall@5 image -> text (an image's hit: one of its own captions among the k nearest
  captions) and text -> image (a caption's hit: its image among the k nearest images).
- ``routing`` (MoE models; null for dense ones): per MoE block and expert, the image and text tokens it
  processed and the image / text share of them; per modality the routing success rate (share of the routed
  token choices not dropped at a full buffer) and the experts used (those processing at least
  ``used_threshold`` of the modality's kept tokens in the block).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common import UserError, load_paths, read_json, store_paths, write_json_atomic

__all__ = [
    "FORMAT",
    "BlockRouting",
    "ImageTextEval",
    "Retrieval",
    "RoutingAnalysis",
    "ZeroShot",
    "read_image_text_eval",
    "write_image_text_eval",
]

FORMAT = "mobile-vmoe-image-text-eval/1"


@dataclass
class ZeroShot:
    num_images: int  # labelled images evaluated
    num_classes: int
    num_templates: int  # prompt templates averaged per class
    top1: float
    top5: float


@dataclass
class Retrieval:
    num_images: int
    num_captions: int
    image_to_text_r1: float
    image_to_text_r5: float
    text_to_image_r1: float
    text_to_image_r5: float


@dataclass
class BlockRouting:
    """One MoE block (E experts)."""

    block: int  # index of the transformer block
    image_tokens: list[int]  # [E] image token choices each expert processed (kept, not dropped)
    text_tokens: list[int]  # [E] text token choices (real caption tokens; padding is routed nowhere)
    image_share: list[float | None]  # [E] image / (image + text) of the expert's tokens; None: it got none
    text_share: list[float | None]  # [E] 1 - image_share
    image_success: float  # kept / routed image token choices
    text_success: float
    image_experts_used: int  # experts with >= used_threshold of the block's kept image tokens
    text_experts_used: int


@dataclass
class RoutingAnalysis:
    num_experts: int
    capacity_ratio: float  # the inference routing it was measured under
    bpr: bool
    used_threshold: float
    image_success: float  # over all blocks
    text_success: float
    image_experts_used: float  # mean over blocks
    text_experts_used: float
    blocks: list[BlockRouting]


@dataclass
class ImageTextEval:
    checkpoint: str
    model: str
    is_moe: bool
    source: str  # the caption set evaluated
    skipped: int  # pairs whose image could not be read
    retrieval: Retrieval
    zero_shot: ZeroShot | None = None
    routing: RoutingAnalysis | None = None


def write_image_text_eval(path: str | os.PathLike[str], ev: ImageTextEval) -> Path:
    # paths inside the directory moving with the file (a pipeline's OUT) relative to it: common.store_paths
    write_json_atomic(path, store_paths({"format": FORMAT, **asdict(ev)}, path, ("checkpoint", "source")))
    return Path(path)


def _build(cls: type, obj: Any, where: str) -> Any:
    """A dataclass from its asdict() form, each field checked against its annotation."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            if f.default is dataclasses.MISSING:
                raise UserError(f"{where}: field {f.name!r} is missing")
            continue
        kwargs[f.name] = _value(obj[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _value(v: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        return None if v is None else _value(v, next(a for a in args if a is not type(None)), where)
    if typing.get_origin(tp) is list:
        if not isinstance(v, list):
            raise UserError(f"{where}: expected a list, got {v!r}")
        return [_value(x, args[0], f"{where}[{i}]") for i, x in enumerate(v)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    ok = {
        bool: isinstance(v, bool),
        int: isinstance(v, int) and not isinstance(v, bool),
        float: isinstance(v, int | float) and not isinstance(v, bool),
        str: isinstance(v, str),
    }[tp]
    if not ok:
        raise UserError(f"{where}: expected {tp.__name__}, got {v!r}")
    return float(v) if tp is float else v


def read_image_text_eval(path: str | os.PathLike[str]) -> ImageTextEval:
    obj = read_json(path, "image-text evaluation")
    obj = load_paths(obj, path, ("checkpoint", "source")) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else None
        raise UserError(f"{path}: not an image-text evaluation (format {got!r}, expected {FORMAT!r})")
    return _build(ImageTextEval, {k: v for k, v in obj.items() if k != "format"}, str(path))
