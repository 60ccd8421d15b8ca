"""`mobile-vmoe eval` of an image-text model (LIMoE, dense one-tower, two-tower CLIP): zero-shot classification,
retrieval, and for a LIMoE the routing of each modality.

    mobile-vmoe eval --checkpoint RUN [--data CAPTION_SET] [--json OUT]

The evaluation pairs are the caption set's ``val`` split (the built-in layout) or the whole source; by default
the caption set the model was trained on. Embeddings come from ``encode_image`` / ``encode_text``, each modality
alone, as the exported phone models compute them:
- zero-shot: each labelled image against the class-name prompts (``prompts.class_embeddings``, templates
  averaged) of the caption set's ``classes.json`` (else the names and templates stored in the model file);
- retrieval: recall@k image -> text and text -> image over all evaluation captions and their distinct images.
Routing (MoE): the pairs run jointly (``forward_with_routing``, eval mode), as in training, and every MoE
block's split routing is counted (``token_moe.routing_stats``). Definitions: ``files.image_text_eval``. The
training loop reports the same numbers per epoch (``image_text_metrics``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .capacity import InferenceRouting, apply_routing
from .captions import CaptionSet, ImageTextDataset, caption_splits, read_caption_set
from .checkpoint import ModelMeta, load_model, read_meta, resolve_model_file
from .common import UserError, existing_path
from .files.captions import OPEN_CLIP_COLUMNS, CaptionColumns
from .files.image_text_eval import (
    BlockRouting,
    ImageTextEval,
    Retrieval,
    RoutingAnalysis,
    ZeroShot,
    write_image_text_eval,
)
from .models.limoe import ModalityRouting
from .models.token_moe import routing_stats
from .prompts import class_embeddings
from .text import Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "RoutingCounts",
    "evaluate_image_text",
    "image_text_metrics",
    "is_image_text_checkpoint",
    "pair_loader",
    "retrieval_recall",
    "summarize_routing",
    "zero_shot_accuracy",
]

USED_THRESHOLD = 0.01  # an expert is "used" by a modality in a block at >= 1 % of its kept tokens there


# ---------------------------------------------------------------------------------------------------------------
# The metrics, on embeddings (N: captions, I: distinct images, C: classes)
# ---------------------------------------------------------------------------------------------------------------


def zero_shot_accuracy(
    image_embeds: torch.Tensor, labels: torch.Tensor, class_embeds: torch.Tensor
) -> tuple[float, float]:
    """(top-1, top-5) of images [I, P] with labels [I] against class embeddings [C, P] (cosine similarity)."""
    top = (image_embeds.float() @ class_embeds.float().T).topk(min(5, class_embeds.shape[0]), dim=1).indices
    hits = top == labels[:, None]
    n = max(len(labels), 1)
    return float(hits[:, 0].sum()) / n, float(hits.any(dim=1).sum()) / n


def retrieval_recall(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, image_of_text: torch.Tensor, k: int
) -> tuple[float, float]:
    """(image -> text, text -> image) recall@k: images [I, P], captions [N, P], image_of_text [N] in [0, I).
    An image's hit: one of its captions among its k nearest; a caption's hit: its image among its k nearest."""
    sim = image_embeds.float() @ text_embeds.float().T  # [I, N]
    n_images, n_texts = sim.shape
    near_texts = sim.topk(min(k, n_texts), dim=1).indices  # [I, k]
    i2t = (image_of_text[near_texts] == torch.arange(n_images)[:, None]).any(dim=1).float().mean()
    near_images = sim.T.topk(min(k, n_images), dim=1).indices  # [N, k]
    t2i = (near_images == image_of_text[:, None]).any(dim=1).float().mean()
    return float(i2t), float(t2i)


class RoutingCounts(NamedTuple):
    """Sums over batches, per MoE block (L blocks, E experts): kept choices per expert and routed choices."""

    image_load: torch.Tensor  # [L, E]
    text_load: torch.Tensor  # [L, E]
    image_routed: torch.Tensor  # [L]
    text_routed: torch.Tensor  # [L] real caption tokens' choices (padding is routed nowhere)

    @classmethod
    def zeros(cls, blocks: int, num_experts: int) -> RoutingCounts:
        z = torch.zeros
        return cls(z(blocks, num_experts, dtype=torch.int64), z(blocks, num_experts, dtype=torch.int64),
                   z(blocks, dtype=torch.int64), z(blocks, dtype=torch.int64))  # fmt: skip

    def add(self, routings: list[ModalityRouting], num_experts: int) -> None:
        for b, r in enumerate(routings):
            for load, routed, half, mask in (
                (self.image_load, self.image_routed, r.image, None),
                (self.text_load, self.text_routed, r.text, r.text_mask),
            ):
                load[b] += routing_stats(half, num_experts, mask)[0].cpu()
                K = half.slot.shape[-1]
                routed[b] += half.slot.numel() if mask is None else int(mask.sum()) * K


def _share(a: torch.Tensor, b: torch.Tensor) -> list[float | None]:
    return [float(x) / float(x + y) if int(x + y) else None for x, y in zip(a, b)]


def _used(load: torch.Tensor, threshold: float) -> int:
    return int((load >= threshold * load.sum().clamp(min=1)).logical_and(load > 0).sum())


def summarize_routing(
    c: RoutingCounts, block_indices: Sequence[int], capacity_ratio: float, bpr: bool,
    threshold: float = USED_THRESHOLD,
) -> RoutingAnalysis:  # fmt: skip
    """The routing analysis (``files.image_text_eval``) of summed counts."""
    rate = lambda kept, routed: float(kept) / max(int(routed), 1)  # noqa: E731
    blocks = [
        BlockRouting(
            block=int(i),
            image_tokens=c.image_load[b].tolist(),
            text_tokens=c.text_load[b].tolist(),
            image_share=_share(c.image_load[b], c.text_load[b]),
            text_share=_share(c.text_load[b], c.image_load[b]),
            image_success=rate(c.image_load[b].sum(), c.image_routed[b]),
            text_success=rate(c.text_load[b].sum(), c.text_routed[b]),
            image_experts_used=_used(c.image_load[b], threshold),
            text_experts_used=_used(c.text_load[b], threshold),
        )
        for b, i in enumerate(block_indices)
    ]
    n = max(len(blocks), 1)
    return RoutingAnalysis(
        num_experts=int(c.image_load.shape[1]),
        capacity_ratio=float(capacity_ratio),
        bpr=bool(bpr),
        used_threshold=threshold,
        image_success=rate(c.image_load.sum(), c.image_routed.sum()),
        text_success=rate(c.text_load.sum(), c.text_routed.sum()),
        image_experts_used=sum(b.image_experts_used for b in blocks) / n,
        text_experts_used=sum(b.text_experts_used for b in blocks) / n,
        blocks=blocks,
    )


# ---------------------------------------------------------------------------------------------------------------
# Running a model over the pairs
# ---------------------------------------------------------------------------------------------------------------


class _Pairs(ImageTextDataset):
    """(image, tokens, row index) per caption row; None where the image cannot be read."""

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, int] | None:  # type: ignore[override]
        item = super().__getitem__(i)
        return None if item is None else (*item, i)


def _collate(batch: Sequence[tuple[Any, torch.Tensor, int] | None]) -> tuple[torch.Tensor, ...] | int:
    good = [b for b in batch if b is not None]
    if not good:
        return len(batch)
    return (torch.stack([torch.as_tensor(b[0]) for b in good]), torch.stack([b[1] for b in good]),
            torch.tensor([b[2] for b in good]), torch.tensor(len(batch) - len(good)))  # fmt: skip


def pair_loader(
    caption_set: CaptionSet, tokenizer: Tokenizer, transform: Any, batch_size: int, num_workers: int = 0,
    cache: bool = False,
) -> torch.utils.data.DataLoader:  # fmt: skip
    """Batches of (images, tokens, row indices, unreadable count) over a caption set, in row order."""
    ds = _Pairs(caption_set, tokenizer, transform, cache=cache)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )


class _Embedded(NamedTuple):
    rows: torch.Tensor  # [N] caption rows whose image read
    image_embeds: torch.Tensor  # [N, P] of each row's image
    text_embeds: torch.Tensor  # [N, P]
    skipped: int
    routing: RoutingCounts | None


@torch.no_grad()
def _embed(model: nn.Module, loader: Any, device: torch.device) -> _Embedded:
    was_training = model.training
    model.eval()
    E = int(getattr(model, "num_experts", 0)) if getattr(model, "is_moe", False) else 0
    counts = RoutingCounts.zeros(len(model.moe_indices), E) if E else None
    rows, imgs, txts, skipped = [], [], [], 0
    for batch in loader:
        if isinstance(batch, int):  # every image of the batch unreadable
            skipped += batch
            continue
        images, tokens, index, bad = (t.to(device) for t in batch)
        skipped += int(bad)
        rows.append(index.cpu())
        imgs.append(model.encode_image(images).float().cpu())
        txts.append(model.encode_text(tokens).float().cpu())
        if counts is not None:  # both modalities routed together, as in training
            counts.add(model.forward_with_routing(images, tokens)[1], E)
    model.train(was_training)
    if not rows:
        raise UserError(f"none of the images of the {skipped} evaluation pairs could be read")
    return _Embedded(torch.cat(rows), torch.cat(imgs), torch.cat(txts), skipped, counts)


def image_text_metrics(
    model: nn.Module,
    caption_set: CaptionSet,
    loader: Any,
    device: torch.device,
    class_names: Sequence[str] = (),
    templates: Sequence[str] = (),
) -> tuple[ZeroShot | None, Retrieval, RoutingAnalysis | None, int]:
    """(zero-shot or None, retrieval, routing or None, unreadable pairs) of ``model`` on a caption set's pairs
    (``loader`` from ``pair_loader``). Zero-shot needs labels and class names."""
    e = _embed(model, loader, device)
    refs = [caption_set.rows[int(r)].image for r in e.rows]
    first_row: dict[Any, int] = {}  # distinct images, first-seen order -> their first row
    for i, ref in enumerate(refs):
        first_row.setdefault(ref, i)
    ids = {ref: i for i, ref in enumerate(first_row)}
    image_of_text = torch.tensor([ids[ref] for ref in refs])
    first = torch.tensor(list(first_row.values()))
    images = e.image_embeds[first]
    r1, r5 = (retrieval_recall(images, e.text_embeds, image_of_text, k) for k in (1, 5))
    retrieval = Retrieval(len(ids), len(refs), r1[0], r5[0], r1[1], r5[1])
    zero_shot = None
    labels = torch.tensor([caption_set.rows[int(e.rows[int(i)])].label for i in first])
    labelled = labels >= 0
    if class_names and templates and labelled.any():
        classes = class_embeddings(model, class_names, templates).cpu()
        top1, top5 = zero_shot_accuracy(images[labelled], labels[labelled], classes)
        zero_shot = ZeroShot(int(labelled.sum()), len(class_names), len(templates), top1, top5)
    routing = None
    if e.routing is not None:
        mlp = model.moe_mlps()[0]
        routing = summarize_routing(e.routing, model.moe_indices, mlp.eval_capacity_ratio, mlp.eval_bpr)
    return zero_shot, retrieval, routing, e.skipped


# ---------------------------------------------------------------------------------------------------------------
# The eval verb
# ---------------------------------------------------------------------------------------------------------------


def is_image_text_checkpoint(checkpoint: str | os.PathLike[str]) -> bool:
    """Whether a model file (or run directory) holds an image-text model (reads the metadata only)."""
    from .models.names import image_text_models

    return read_meta(checkpoint).model in image_text_models()


def _eval_source(ckpt: Path, meta: ModelMeta, data: str | os.PathLike[str] | None) -> Path:
    """The caption source to evaluate on: ``data`` or the trained-on set; its val split where it has one."""
    if data is None:
        if not meta.train.data_dir:
            raise UserError(f"{ckpt}: metadata train.data_dir is missing; pass --data CAPTION_SET")
        data = existing_path(meta.train.data_dir, ckpt, "metadata train.data_dir", "pass --data CAPTION_SET")
    if not Path(data).exists():
        raise UserError(f"caption set not found: {data} (pass --data CAPTION_SET)")
    return caption_splits(data)[-1]  # [train, val] of the built-in layout: val; else the one source


def evaluate_image_text(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    json_out: str | os.PathLike[str] | None = None,
    num_workers: int = 0,
    columns: CaptionColumns = OPEN_CLIP_COLUMNS,
    routing: InferenceRouting | None = None,
) -> ImageTextEval:
    """Zero-shot, retrieval and routing of an image-text model file (or run directory) on a caption set;
    ``routing``: a LIMoE's inference capacity ratio, BPR and K. Also written to ``json_out``."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    ckpt = resolve_model_file(checkpoint)
    model, meta = load_model(ckpt)
    if routing is not None:
        apply_routing(model, routing, ckpt)
    source = _eval_source(ckpt, meta, data)
    cs = read_caption_set(source, columns)
    classes = cs.classes
    names, templates = (classes.class_names, classes.templates) if classes else (meta.class_names,
                                                                                 meta.prompt_templates)  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = pair_loader(
        cs, Tokenizer(model.context_length), meta.preprocess.transform(), batch_size, num_workers
    )
    zs, ret, rt, skipped = image_text_metrics(model.to(device), cs, loader, device, names, templates)
    if zs is None:
        log.warning("%s: no class labels or class names: no zero-shot accuracy", source)
    ev = ImageTextEval(str(ckpt), meta.model, bool(model.is_moe), str(source), skipped, ret, zs, rt)
    if json_out is not None:
        write_image_text_eval(json_out, ev)
    return ev


def format_image_text(ev: ImageTextEval) -> str:
    r = ev.retrieval
    lines = [
        f"{ev.model} on {ev.source}: {r.num_images} images, {r.num_captions} captions"
        + (f" ({ev.skipped} unreadable, skipped)" if ev.skipped else ""),
        f"retrieval R@1 / R@5: image->text {100 * r.image_to_text_r1:.2f} / {100 * r.image_to_text_r5:.2f} %"
        f"   text->image {100 * r.text_to_image_r1:.2f} / {100 * r.text_to_image_r5:.2f} %",
    ]
    if ev.zero_shot is not None:
        z = ev.zero_shot
        lines.append(f"zero-shot ({z.num_classes} classes, {z.num_templates} templates): top-1 "
                     f"{100 * z.top1:.2f} %   top-5 {100 * z.top5:.2f} %")  # fmt: skip
    if ev.routing is not None:
        g = ev.routing
        lines.append(
            f"routing (capacity {g.capacity_ratio:g}, BPR {'on' if g.bpr else 'off'}): success image "
            f"{100 * g.image_success:.1f} % text {100 * g.text_success:.1f} %; experts used (>= "
            f"{100 * g.used_threshold:g} % of tokens) image {g.image_experts_used:.1f} text "
            f"{g.text_experts_used:.1f} of {g.num_experts}"
        )
        for b in g.blocks:
            share = " ".join("-" if s is None else f"{s:.2f}" for s in b.image_share)
            lines.append(f"block {b.block}: image share per expert [{share}]")
    return "\n".join(lines)


def image_text_cli(args: argparse.Namespace) -> int:
    """``mobile-vmoe eval`` for an image-text checkpoint (options of a classifier evaluation are refused)."""
    for flag, value in (("--split heldout", args.split != "val"), ("--file-list", args.file_list),
                        ("--superclasses", args.superclasses)):  # fmt: skip
        if value:
            raise UserError(f"{args.checkpoint}: an image-text model; {flag} applies to classifiers only")
    ratios, priorities = args.capacity_ratio or [], args.priority or []
    if len(ratios) > 1 or len(priorities) > 1:
        raise UserError("a capacity sweep applies to classifiers; give one --capacity-ratio / --priority")
    routing = InferenceRouting(
        ratios[0] if ratios else None, priorities[0] if priorities else None, args.top_k
    )
    columns = CaptionColumns(args.csv_img_key, args.csv_caption_key, args.csv_label_key)
    ev = evaluate_image_text(args.checkpoint, args.data, args.batch_size, args.json, args.num_workers,
                             columns, routing)  # fmt: skip
    print(format_image_text(ev))
    if args.json:
        print(f"wrote {args.json}")
    return 0
