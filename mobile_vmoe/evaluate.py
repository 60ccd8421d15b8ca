"""`mobile-vmoe eval`: top-1/top-5 of a trained model; for a MoE also routing statistics. An image-text model
(LIMoE, CLIP) is evaluated by ``evaluate_image_text`` instead (zero-shot, retrieval, routing by modality).

    mobile-vmoe eval --checkpoint RUN [--data DIR] [--split val|heldout] [--json OUT]

For a MoE the report adds the router's accuracy against the super-classes (when the model was trained with a
super-class map, or ``--superclasses`` is given), the number of images routed to each expert (all K choices),
the accuracy of the images whose first choice is each expert, and the class x expert count matrix (all K
choices) in the JSON, from which a heatmap can be drawn. The training loop computes its per-epoch validation
metrics with the same ``eval_counts`` / ``summarize_counts``. Shape letters as in ``mobile_vmoe/models/moe.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .capacity import EVAL_BATCH_SIZE, InferenceRouting, apply_routing, capacity_curve
from .checkpoint import ModelMeta, load_model, resolve_model_file
from .common import UserError, existing_path, store_paths, write_json_atomic
from .data import ImageListDataset, collate_skip_bad, scan_dataset
from .files.capacity_curve import PRIORITIES
from .files.file_list import Sample, read_file_list
from .files.superclass_map import read_superclass_map
from .models.moe import Routing
from .models.token_moe import TokenRouting, priority_name

log = logging.getLogger(__name__)

__all__ = ["evaluate", "eval_counts", "summarize_counts"]


def routed_forward(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
    """``(logits, Routing)`` of a Mobile V-MoE, ``(logits, None)`` of a dense model."""
    fwr = getattr(model, "forward_with_routing", None)
    return fwr(images) if fwr is not None else (model(images), None)


def _zero_counts(C: int, E: int, L_token: int = 0) -> dict[str, torch.Tensor]:
    """Zeroed sums; ``L_token`` > 0: a per-token model with that many MoE blocks."""
    c = {
        "n": torch.zeros((), dtype=torch.int64),
        "correct1": torch.zeros((), dtype=torch.int64),
        "correct5": torch.zeros((), dtype=torch.int64),
        "loss_sum": torch.zeros((), dtype=torch.float64),
        "skipped": torch.zeros((), dtype=torch.int64),
    }
    if L_token:
        c["block_expert"] = torch.zeros(L_token, E, dtype=torch.int64)  # choices each expert processed
        c["block_dropped"] = torch.zeros(L_token, dtype=torch.int64)  # choices past a full buffer
        c["block_choices"] = torch.zeros(L_token, dtype=torch.int64)
        c["block_class_weight"] = torch.zeros(
            L_token, C, E, dtype=torch.float64
        )  # summed mean routing weight
        c["class_n"] = torch.zeros(C, dtype=torch.int64)
    elif E:
        c["class_expert"] = torch.zeros(C, E, dtype=torch.int64)  # all K choices
        c["expert_n"] = torch.zeros(E, dtype=torch.int64)  # images whose first choice is e
        c["expert_correct"] = torch.zeros(E, dtype=torch.int64)
        c["router_correct"] = torch.zeros((), dtype=torch.int64)
    return c


def _count_routing(
    c: dict[str, torch.Tensor],
    routing: Routing,
    targets: torch.Tensor,
    hit1: torch.Tensor,
    super_of: torch.Tensor | None,
) -> None:
    """Add one batch's routing to ``c``: targets [B], hit1 [B] (top-1 correct), super_of [C]; all on the CPU."""
    idx = routing.expert_idx.cpu()  # [B, K]
    B, K = idx.shape
    E = c["expert_n"].numel()
    c["class_expert"].index_put_(
        (targets.repeat_interleave(K), idx.reshape(-1)), torch.ones(B * K, dtype=torch.int64), accumulate=True
    )
    first = idx[:, 0]
    c["expert_n"] += torch.bincount(first, minlength=E)
    c["expert_correct"] += torch.bincount(first, weights=hit1.double(), minlength=E).long()
    if super_of is not None:
        c["router_correct"] += (routing.logits.argmax(dim=1).cpu() == super_of.cpu()[targets]).sum()


def _count_token_routing(
    c: dict[str, torch.Tensor], routing: list[TokenRouting], targets: torch.Tensor
) -> None:
    """Add one batch of a per-token model: per block, expert load, drops and each class's routing weights."""
    B = targets.numel()
    c["class_n"] += torch.bincount(targets, minlength=c["class_n"].numel())
    for i, r in enumerate(routing):
        E, P = r.probs.shape[-1], r.capacity
        slot = r.slot.reshape(-1).cpu()
        kept = slot < E * P
        c["block_expert"][i] += torch.bincount(torch.div(slot[kept], P, rounding_mode="floor"), minlength=E)
        c["block_dropped"][i] += int((~kept).sum())
        c["block_choices"][i] += slot.numel()
        per_image = (
            r.probs.reshape(B, -1, E).mean(dim=1).double().cpu()
        )  # [B, E] mean over the image's tokens
        c["block_class_weight"][i].index_add_(0, targets, per_image)


@torch.no_grad()
def eval_counts(
    model: torch.nn.Module,
    loader: Any,
    num_classes: int,
    super_of: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Sums over a loader of ``(images, targets, n_skipped)`` batches; every value is a tensor, so ranks can
    all-reduce them. ``super_of`` [C] maps class -> super-class for the router accuracy."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    E = int(getattr(model, "num_experts", 0) or 0)
    token = getattr(model, "moe_routing", None) == "token"
    c = _zero_counts(num_classes, E, int(model.num_moe_layers) if token else 0)
    k5 = min(5, num_classes)
    for images, targets, n_bad in loader:
        c["skipped"] += int(n_bad)
        if len(targets) == 0:
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, routing = routed_forward(model, images)
        logits = logits.float()
        top = logits.topk(k5, dim=1).indices  # [B, k5]
        hit1 = (top[:, 0] == targets).cpu()
        c["n"] += len(targets)
        c["correct1"] += hit1.sum()
        c["correct5"] += (top == targets[:, None]).any(dim=1).sum().cpu()
        c["loss_sum"] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().cpu()
        if token:
            _count_token_routing(c, routing, targets.cpu())
        elif E and routing is not None:
            _count_routing(c, routing, targets.cpu(), hit1, super_of)
    model.train(was_training)
    return c


def summarize_counts(c: dict[str, torch.Tensor], with_router_accuracy: bool = False) -> dict[str, Any]:
    """JSON-friendly metrics from ``eval_counts`` sums."""
    n = int(c["n"])
    out: dict[str, Any] = {
        "num_images": n,
        "skipped": int(c["skipped"]),
        "top1": float(c["correct1"]) / max(n, 1),
        "top5": float(c["correct5"]) / max(n, 1),
        "loss": float(c["loss_sum"]) / max(n, 1),
    }
    if "block_expert" in c:  # per-token: per MoE block
        out["expert_load"] = c["block_expert"].tolist()  # [L][E]
        out["dropped_fraction"] = (c["block_dropped"].double() / c["block_choices"].clamp(min=1)).tolist()
        n_c = c["class_n"].clamp(min=1).double().reshape(1, -1, 1)
        out["class_expert_weight"] = (c["block_class_weight"] / n_c).tolist()  # [L][C][E] mean routing weight
    if "class_expert" in c:
        en = c["expert_n"]
        out["expert_load"] = c["class_expert"].sum(dim=0).tolist()
        out["expert_images_top1"] = en.tolist()
        out["expert_accuracy"] = [
            (float(ok) / int(m)) if int(m) else None for ok, m in zip(c["expert_correct"], en)
        ]
        out["router_accuracy"] = float(c["router_correct"]) / max(n, 1) if with_router_accuracy else None
        out["class_expert_counts"] = c["class_expert"].tolist()
    return out


class EvalSet(NamedTuple):
    """The images an evaluation runs on."""

    samples: list[Sample]
    split: str  # val | heldout | file_list
    source: str  # where the list came from: the val/ folder or the list file


def _dataset_dir(ckpt: Path, meta: ModelMeta, data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir``, or the dataset the model was trained on (it moves with the run directory only when inside it
    or its pipeline directory: a dataset moved on its own needs --data)."""
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise UserError(f"dataset directory not found: {data_dir}")
        return Path(data_dir)
    if not meta.train.data_dir:
        raise UserError(f"{ckpt}: metadata train.data_dir is missing; pass --data DIR")
    if not Path(meta.train.data_dir).is_dir():
        raise UserError(
            f"{ckpt}: metadata train.data_dir: the dataset it was trained on, {meta.train.data_dir}, is not there; "
            f"pass --data DIR"
        )
    return Path(meta.train.data_dir)


def _eval_set(
    ckpt: Path, meta: ModelMeta, data_dir: Path, file_list: str | os.PathLike[str] | None, split: str
) -> EvalSet:
    if file_list is not None:
        images = EvalSet(read_file_list(file_list, data_dir), "file_list", str(file_list))
    elif split == "heldout":
        # the model file keeps the list relative to itself: a moved or copied run reads its own heldout.txt
        held = meta.train.heldout_list
        if not held:
            raise UserError(f"{ckpt}: metadata train.heldout_list is missing; pass --file-list")
        if not Path(held).is_file():
            raise UserError(f"{ckpt}: its held-out list {held} is missing; pass --file-list")
        images = EvalSet(read_file_list(held, data_dir), split, held)
    else:
        index = scan_dataset(data_dir, num_classes=len(meta.class_names))
        if index.class_names != meta.class_names:
            raise UserError(f"{data_dir}: class folders differ from the class names stored in {ckpt}")
        images = EvalSet(index.val, split, str(data_dir / "val"))
    if not images.samples:
        raise UserError(f"no images to evaluate in {images.source}")
    C = len(meta.class_names)
    bad = next((s for s in images.samples if s.target >= C), None)
    if bad is not None:
        raise UserError(f"{images.source}: class index {bad.target} ({bad.path}) >= number of classes {C}")
    return images


def _router_truth(
    model: torch.nn.Module, meta: ModelMeta, superclasses: str | os.PathLike[str] | None, ckpt: Path
) -> tuple[torch.Tensor | None, str | None]:
    """(super-class of each class [C], its superclasses.json) for a MoE's router accuracy, or (None, path)."""
    path = superclasses or meta.train.superclasses
    if not path or not getattr(model, "is_moe", False):
        return None, str(path) if path else None
    if not superclasses:  # the one it was trained against: gone when its run was moved without it
        existing_path(path, ckpt, "metadata train.superclasses", "pass --superclasses FILE")
    return torch.tensor(read_superclass_map(path, meta.class_names).assignment), str(path)


class Evaluation(NamedTuple):
    """A loaded model and the images it is evaluated on, ready to run (possibly under several routings)."""

    ckpt: Path
    model: torch.nn.Module
    meta: ModelMeta
    data_dir: Path
    images: EvalSet
    loader: Any
    device: torch.device


def prepare_evaluation(
    checkpoint: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    file_list: str | os.PathLike[str] | None = None,
    split: str = "val",
    batch_size: int = EVAL_BATCH_SIZE,
    num_workers: int = 0,
    routing: InferenceRouting | None = None,
) -> Evaluation:
    """Check the inputs and load the model (under ``routing``) and its images (with the preprocessing stored in
    the model file)."""
    if split not in ("val", "heldout"):
        raise UserError(f"split must be 'val' or 'heldout', got {split!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if routing is not None and routing.group_size and batch_size % routing.group_size:
        # a batch routes whole groups only: a smaller group would silently change the routing measured
        raise UserError(f"--group-size {routing.group_size} must divide --batch-size {batch_size}")
    ckpt = resolve_model_file(checkpoint)
    model, meta = load_model(ckpt)
    if routing is not None:  # before the images: a wrong option fails fast
        apply_routing(model, routing, ckpt)
    data_dir = _dataset_dir(ckpt, meta, data_dir)
    images = _eval_set(ckpt, meta, data_dir, file_list, split)
    loader = torch.utils.data.DataLoader(
        ImageListDataset(data_dir, images.samples, meta.preprocess.transform()),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
    )
    # ImageNet's 50k val images want a GPU when there is one
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Evaluation(ckpt, model.to(device), meta, data_dir, images, loader, device)


def run_counts(ev: Evaluation, super_of: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    counts = eval_counts(ev.model, ev.loader, len(ev.meta.class_names), super_of=super_of, device=ev.device)
    if int(counts["n"]) == 0:
        raise UserError(f"none of the {len(ev.images.samples)} images in {ev.images.source} could be read")
    return counts


def evaluate(
    checkpoint: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    file_list: str | os.PathLike[str] | None = None,
    split: str = "val",
    batch_size: int = EVAL_BATCH_SIZE,
    json_out: str | os.PathLike[str] | None = None,
    num_workers: int = 0,
    superclasses: str | os.PathLike[str] | None = None,
    routing: InferenceRouting | None = None,
) -> dict[str, Any]:
    """Evaluate a model file (or run / checkpoint directory) on ``split`` (val | heldout) or a file list, with
    the preprocessing stored in the model file; a per-token V-MoE under ``routing`` (capacity, BPR, K).
    Returns the report, also written to ``json_out``."""
    ev = prepare_evaluation(checkpoint, data_dir, file_list, split, batch_size, num_workers, routing)
    ckpt, model, meta, data_dir, images = ev.ckpt, ev.model, ev.meta, ev.data_dir, ev.images
    super_of, sc_path = _router_truth(model, meta, superclasses, ckpt)
    counts = run_counts(ev, super_of)

    result: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "model": meta.model,
        "is_moe": bool(getattr(model, "is_moe", False)),
        "data_dir": str(data_dir),
        "split": images.split,
        "source": images.source,
        **summarize_counts(counts, with_router_accuracy=super_of is not None),
        "class_names": meta.class_names,
    }
    if result["is_moe"]:
        result.update(num_experts=model.num_experts, top_k=model.top_k, superclasses=sc_path)
    if getattr(model, "moe_routing", None) == "token":
        mlp = model.moe_mlps()[0]
        result.update(routing="token", capacity_ratio=mlp.eval_capacity_ratio, bpr=mlp.eval_bpr,
                      priority=priority_name(mlp.eval_bpr, mlp.eval_cls_first),
                      group_size=mlp.eval_group_size)  # fmt: skip
    if json_out is not None:  # relocatable: paths inside the moving directory relative (common.store_paths)
        write_json_atomic(
            json_out, store_paths(result, json_out, ("checkpoint", "data_dir", "source", "superclasses"))
        )
    return result


def _format(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']} on {r['source']}: {r['num_images']} images"
        + (f" ({r['skipped']} unreadable, skipped)" if r["skipped"] else ""),
        f"top-1 {100 * r['top1']:.2f} %   top-5 {100 * r['top5']:.2f} %   loss {r['loss']:.4f}",
    ]
    if r.get("routing") == "token":
        lines.append(
            f"per-token routing: capacity ratio {r['capacity_ratio']:g}, priority {r['priority']}, K={r['top_k']}, "
            f"{r['group_size']} image(s) per routing group"
        )
        for i, (d, load) in enumerate(zip(r["dropped_fraction"], r["expert_load"])):
            lines.append(f"MoE block {i}: {100 * d:.1f} % of choices dropped; tokens per expert {load}")
    elif r["is_moe"]:
        if r.get("router_accuracy") is not None:
            lines.append(f"router accuracy against the super-classes: {100 * r['router_accuracy']:.2f} %")
        lines.append("expert  images  accuracy (images whose first choice it is)")
        for e, (load, acc) in enumerate(zip(r["expert_load"], r["expert_accuracy"])):
            lines.append(f"{e:6d}  {load:6d}  " + (f"{100 * acc:6.2f} %" if acc is not None else "     -"))
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from .evaluate_image_text import image_text_cli, is_image_text_checkpoint

    if is_image_text_checkpoint(args.checkpoint):  # zero-shot, retrieval and routing analysis instead
        return image_text_cli(args)
    ratios, priorities, groups = args.capacity_ratio or [], args.priority or [], args.group_size or []
    data = dict(data_dir=args.data, file_list=args.file_list, split=args.split, batch_size=args.batch_size,
                num_workers=args.num_workers)  # fmt: skip
    if len(ratios) > 1 or len(priorities) > 1 or len(groups) > 1:
        if not args.json:
            raise UserError(
                "a capacity sweep (several --capacity-ratio, --priority or --group-size values) needs --json OUT"
            )
        curve = capacity_curve(args.checkpoint, ratios or [1.0], priorities or None, args.top_k,
                               args.json, groups or [1], **data)  # fmt: skip
        for p in curve.points:
            print(f"{p.group_size:3d} image(s)/group  {p.priority:8s} capacity {p.capacity_ratio:<6g} "
                  f"P={p.capacity:<4d} top-1 {100 * p.top1:6.2f} %")  # fmt: skip
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.png')}")
        return 0
    routing = InferenceRouting(
        ratios[0] if ratios else None,
        priorities[0] if priorities else None,
        args.top_k,
        groups[0] if groups else None,
    )
    r = evaluate(
        args.checkpoint,
        data_dir=args.data,
        file_list=args.file_list,
        split=args.split,
        batch_size=args.batch_size,
        json_out=args.json,
        num_workers=args.num_workers,
        superclasses=args.superclasses,
        routing=routing,
    )
    print(_format(r))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 of a trained model; routing statistics for a MoE; zero-shot, retrieval and routing "
        "by modality for an image-text model",
    )
    p.add_argument("--checkpoint", required=True, help="model .safetensors, run dir or checkpoint dir")
    p.add_argument(
        "--data",
        default=None,
        help="dataset dir, or an image-text model's caption set (its val split where it has one); default: "
        "the data the checkpoint was trained on",
    )
    p.add_argument(
        "--split", choices=("val", "heldout"), default="val", help="val/ images or RUN/heldout.txt"
    )
    p.add_argument(
        "--file-list", default=None, help="evaluate these images instead (relative/path<TAB>class)"
    )
    p.add_argument("--superclasses", default=None, help="superclasses.json for the router accuracy (MoE)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full report (with class x expert counts) here")
    g = p.add_argument_group("per-token V-MoE routing at inference (no retraining)")
    g.add_argument("--capacity-ratio", type=float, nargs="+", default=None,
                   help="expert buffer size; several values: the accuracy vs capacity curve (JSON + PNG at --json)")  # fmt: skip
    g.add_argument("--priority", choices=PRIORITIES, nargs="+", default=None,
                   help="bpr: Batch Priority Routing; vanilla: tokens in order; bpr_cls: BPR with each image's class "
                   "token first (ours); default for a sweep: each that applies")  # fmt: skip
    g.add_argument("--top-k", type=int, default=None, help="K experts per token")
    g.add_argument("--group-size", type=int, nargs="+", default=None,
                   help="images whose tokens are routed together (default: the model's, 1 = each image alone as "
                   "on a phone; V-MoE evaluates groups of 8); several values: one curve each")  # fmt: skip
    t = p.add_argument_group("image-text models: the caption table's columns")
    t.add_argument("--csv-img-key", default="filepath", help="image path column (filepath)")
    t.add_argument("--csv-caption-key", default="title", help="caption column (title)")
    t.add_argument("--csv-label-key", default="label", help="optional class index column (label)")
    p.set_defaults(func=_cli)
