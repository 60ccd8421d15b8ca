"""`mobile-vmoe train`: one training loop for the dense ViT baseline and the Mobile V-MoE.

    mobile-vmoe train --config synthetic [--model mobile_vmoe_nano_patch8_32 --superclasses S.json] [k=v ...]
    torchrun --nproc-per-node 8 -m mobile_vmoe.cli train --config imagenet1k_tiny --data /imagenet

The loop (``train``) reads top to bottom like nanoGPT's train.py: validate everything -> build data, model,
optimizer -> maybe resume -> for each step: forward, loss, backward, step, EMA, log, checkpoint -> per epoch:
evaluate -> final weights. Recipe pieces are timm's own factories (create_transform, Mixup,
create_optimizer_v2, create_scheduler_v2, ModelEmaV3).

Decisions:
- Number of classes: ``model_kwargs.num_classes`` if set (it must equal the number of class folders, else a
  UserError before training), otherwise taken from the data.
- Held-out split: carved from train/ (``data.heldout_fraction``, at least ``heldout_min_per_class`` per class),
  written to RUN/heldout.txt and never trained on; the super-class stage evaluates exactly these images.
- MoE loss: L = CE(logits, y) + router_loss_weight * CE(router logits, super-class of y) with a super-class map;
  with mixup the super-class target is the mixed soft class target mapped through the assignment matrix A [C, S]
  (soft_super = soft_target @ A). Without a map: L = CE + balance_loss_weight * V-MoE importance loss.
- DDP + MoE: an expert that gets no image in a step has no gradient on that rank, so the MoE is wrapped with
  ``find_unused_parameters=True`` (the dense model without it). The alternative, adding 0 * sum(unused params)
  to the loss, hands AdamW zero gradients, which still moves those experts (momentum, weight decay): training
  would differ from one process. Measured cost on 2 CPU ranks (gloo, mobile_vmoe_nano_patch4_32 depth 6,
  batch 2 x 64): see the DDP note in tests/test_train.py's module docstring.
- Checkpoints: RUN/checkpoints/step_XXXXXXXX/{model.safetensors, state.pt, COMPLETE}, written in a temporary
  directory and renamed; every ``checkpoint.every_n_steps`` steps and at every epoch end; the last
  ``keep_last`` are kept. state.pt holds only tensors and plain Python values (loads with weights_only=True).
  Resuming restores weights, optimizer, scheduler, scaler, EMA and the position in the epoch's data order (the
  order is a function of seed and epoch); all randomness (augmentation, mixup, drop path) is re-seeded from
  (seed, rank, step) after every step, so with ``data.num_workers=0`` a resumed run ends with the weights of an
  uninterrupted one (with workers, their augmentation streams restart at the resume point).
- Final weights: RUN/model.safetensors holds the EMA weights when ``ema`` is on (that is what DeiT reports and
  deploys), else the trained weights; checkpoints always hold the trained weights (EMA in state.pt).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import MODEL_FILE, ModelMeta, TrainInfo, save_model
from .common import UserError, atomic_path, write_text_atomic
from .config import Config, config_to_dict, dump_yaml, load_config, model_kwargs
from .evaluate import eval_counts, routed_forward, summarize_counts
from .files.superclass_map import read_superclass_map
from .preprocess import Preprocess

log = logging.getLogger(__name__)

__all__ = ["train", "train_step", "Objective", "RoutedForward", "find_checkpoint"]

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "state.pt"


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (also used by benchmarks/train_throughput.py)
# ---------------------------------------------------------------------------------------------------------------


class RoutedForward(nn.Module):
    """``forward(x) -> (logits, routing or None)``. DDP hooks run only for the wrapped module's ``forward``, so
    the training forward must be this module's forward, not a call to ``model.forward_with_routing``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return routed_forward(self.model, x)


class Objective:
    """Classification loss plus the router's loss: super-class CE with a map, load balancing without."""

    def __init__(
        self,
        num_classes: int,
        num_experts: int = 0,
        assignment: list[int] | None = None,
        router_loss_weight: float = 0.3,
        balance_loss_weight: float = 0.01,
        label_smoothing: float = 0.0,
    ) -> None:
        from mobile_vmoe.models import expert_load, load_balancing_loss

        self._expert_load, self._balance = expert_load, load_balancing_loss
        self.C, self.E = num_classes, num_experts
        self.router_w, self.balance_w = router_loss_weight, balance_loss_weight
        self.label_smoothing = label_smoothing
        self.super_of = self.A = None
        if assignment is not None:
            self.super_of = torch.tensor(assignment, dtype=torch.long)  # [C]
            self.A = F.one_hot(self.super_of, max(assignment) + 1).float()  # [C, S]

    def to(self, device: torch.device) -> Objective:
        if self.super_of is not None:
            self.super_of, self.A = self.super_of.to(device), self.A.to(device)
        return self

    def __call__(
        self, logits: torch.Tensor, routing: Any, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """target: [B] class indices, or [B, C] soft targets (mixup/cutmix, already label-smoothed)."""
        soft = target.ndim == 2
        logits = logits.float()
        if soft:
            cls = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()  # SoftTargetCrossEntropy
        else:
            cls = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        loss = cls
        parts = {"cls_loss": cls.detach()}
        if routing is not None:
            r_logits = routing.logits.float()  # [B, E]
            if self.A is not None:
                if soft:
                    super_t = target @ self.A  # [B, S]: the mixed class target mapped to super-classes
                    r_loss = torch.sum(-super_t * F.log_softmax(r_logits, dim=-1), dim=-1).mean()
                    super_hard = super_t.argmax(dim=1)
                else:
                    super_hard = self.super_of[target]
                    r_loss = F.cross_entropy(r_logits, super_hard)
                loss = loss + self.router_w * r_loss
                parts["router_loss"] = r_loss.detach()
                parts["router_correct"] = (r_logits.argmax(dim=1) == super_hard).sum()
            else:
                b_loss = self._balance(routing)
                loss = loss + self.balance_w * b_loss
                parts["balance_loss"] = b_loss.detach()
            parts["expert_load"] = self._expert_load(routing, self.E)
        parts["loss"] = loss.detach()
        return loss, parts


def train_step(
    fwd: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    objective: Objective,
    mixup: Any = None,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
    clip_grad: float | None = None,
    zero_batch: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimizer step; returns detached loss parts (no host sync). ``zero_batch``: this rank has no image
    (all unreadable) but DDP peers do: run a zero-weighted step so the gradient all-reduce still happens."""
    if mixup is not None:
        images, targets = mixup(images, targets)
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits, routing = fwd(images)
    loss, parts = objective(logits, routing, targets)
    if zero_batch:
        loss = loss * 0.0
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(fwd.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(fwd.parameters(), clip_grad)
        optimizer.step()
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint_dirs(run: Path) -> list[Path]:
    d = run / CKPT_DIR
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def find_checkpoint(run: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """Newest COMPLETE checkpoint of a run whose state loads, as (dir, state); torn ones are skipped, warned."""
    for d in reversed(_checkpoint_dirs(Path(run))):
        if not (d / COMPLETE).is_file():
            log.warning("skipping checkpoint %s: no %s marker (torn or partial write)", d, COMPLETE)
            continue
        try:
            state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
            if not (d / MODEL_FILE).is_file():
                raise FileNotFoundError(d / MODEL_FILE)
        except Exception as e:  # a damaged file in a marked directory: fall back to an older checkpoint
            log.warning("skipping checkpoint %s: cannot load it (%s)", d, e)
            continue
        return d, state
    return None


def _save_checkpoint(
    run: Path, step: int, model: nn.Module, meta: ModelMeta, state: dict[str, Any], keep_last: int
) -> Path:
    final = run / CKPT_DIR / f"step_{step:08d}"
    if (final / COMPLETE).is_file():
        return final
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_model(tmp / MODEL_FILE, model, meta)
        torch.save(state, tmp / STATE_FILE)
        (tmp / COMPLETE).write_text(f"step {step}\n")  # last: a directory with it is whole
    complete = [d for d in _checkpoint_dirs(run) if (d / COMPLETE).is_file()]
    for old in complete[: max(0, len(complete) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------------------------


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise UserError(f"config key device: not a torch device: {cfg.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config key device: {cfg.device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    choices = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16}
    choices.update({"fp16": torch.float16, "off": None})
    if cfg.amp not in choices:
        raise UserError(f"config key amp: expected auto | bf16 | fp16 | off, got {cfg.amp!r}")
    return choices[cfg.amp]


def _reseed(seed: int, rank: int, step: int) -> None:
    s = (seed * 1_000_003 + rank * 10_007 + step) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _all_reduce(d: dict[str, torch.Tensor], device: torch.device, world: int) -> dict[str, torch.Tensor]:
    if world == 1:
        return d
    out = {}
    for k, v in d.items():
        t = v.to(device).clone()
        dist.all_reduce(t)
        out[k] = t.cpu()
    return out


def _validate_superclasses(cfg: Config, model: nn.Module, class_names: list[str]) -> list[int] | None:
    path = cfg.moe.superclasses
    if not path:
        return None
    if not getattr(model, "is_moe", False):
        raise UserError(
            f"moe.superclasses ({path}) is given but {cfg.model} is a dense model; use a mobile_vmoe_* model"
        )
    sc = read_superclass_map(path, class_names)
    assignment = sc.assignment
    S = sc.num_superclasses
    if S != model.num_experts:
        raise UserError(
            f"{path}: {S} super-classes, but {cfg.model} has E={model.num_experts} experts; the super-class "
            f"router loss needs E == S (set moe_kwargs.num_experts={S})"
        )
    return assignment


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


def train(cfg: Config) -> Path:
    """Train ``cfg.model`` as configured; returns the run directory (see docs/FILES.md)."""
    from timm.data import Mixup, create_transform
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    import mobile_vmoe.models  # noqa: F401  (registers the model names)

    from .data import ImageListDataset, collate_skip_bad, heldout_split, prepare_dataset, scan_dataset
    from .files.file_list import read_file_list, write_file_list

    rank, world, local_rank = _dist_env()
    main = rank == 0
    if not cfg.out:
        cfg.out = str(Path("runs") / f"{cfg.name}-{cfg.model}")
    run = Path(cfg.out).absolute()

    # ---- everything that can be wrong with the input is checked here, before any training ----------------
    device = _device(cfg, local_rank)
    amp_dtype = _amp_dtype(cfg, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.model not in timm.list_models("mobile_v*"):
        raise UserError(f"config key model: {cfg.model!r} is not a mobile_vit_* / mobile_vmoe_* model")
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} must be a positive multiple of the world size {world}")
    B = cfg.batch_size // world  # per rank
    if cfg.log_interval < 1:
        raise UserError(f"config key log_interval must be >= 1, got {cfg.log_interval}")
    if cfg.schedule.epochs < 1:
        raise UserError(f"config key schedule.epochs must be >= 1, got {cfg.schedule.epochs}")
    if not cfg.data.spec:
        raise UserError("no dataset: pass --data DIR or --dataset synthetic|digits (config key data.spec)")
    ds_kwargs = dict(cfg.data.dataset_kwargs)
    ds_seed = int(ds_kwargs.pop("seed", 0))
    data_dir = prepare_dataset(cfg.data.spec, root=cfg.data.root, seed=ds_seed, **ds_kwargs).absolute()
    index = scan_dataset(data_dir)
    C = len(index.class_names)
    want_C = model_kwargs(cfg).get("num_classes")
    if want_C is not None and want_C != C:
        raise UserError(
            f"{data_dir / 'train'}: {C} class folders, but model_kwargs.num_classes={want_C}; "
            f"fix the data or drop num_classes to take it from the data"
        )
    kwargs = {**model_kwargs(cfg), "num_classes": C}
    if cfg.data.image_size:
        if kwargs.setdefault("img_size", cfg.data.image_size) != cfg.data.image_size:
            raise UserError(
                f"data.image_size={cfg.data.image_size} but model_kwargs.img_size={kwargs['img_size']}"
            )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    try:
        model = timm.create_model(cfg.model, drop_path_rate=cfg.aug.drop_path, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {cfg.model} with model_kwargs {kwargs}: {e}") from None
    is_moe = bool(getattr(model, "is_moe", False))
    E = model.num_experts if is_moe else 0
    image_size = int(model.patch_embed.img_size[0])
    assignment = _validate_superclasses(cfg, model, index.class_names)

    train_samples, heldout = heldout_split(
        index.train, cfg.data.heldout_fraction, cfg.data.heldout_min_per_class, seed=cfg.seed
    )
    heldout_file = run / "heldout.txt"
    existing = _checkpoint_dirs(run)
    if existing and not cfg.resume:
        raise UserError(f"{run} already holds checkpoints: pass --resume to continue, or another --out")
    if cfg.resume and heldout_file.is_file():
        if set(read_file_list(heldout_file, data_dir)) != set(heldout):
            raise UserError(f"{heldout_file}: differs from this config's held-out split; cannot resume")
    n_per_rank = math.ceil(len(train_samples) / world)  # DistributedSampler pads to a multiple of world
    spe = n_per_rank // B  # steps per epoch (drop_last: every step has a full batch)
    if spe == 0:
        raise UserError(
            f"{len(train_samples)} training images (after the held-out split) are fewer than one batch of "
            f"{B} per rank; lower batch_size"
        )
    total = spe * cfg.schedule.epochs
    if cfg.schedule.max_steps:
        total = min(total, cfg.schedule.max_steps)
    if not index.val:
        log.warning("%s has no val/ images: no per-epoch evaluation", data_dir)

    # ---- process group (after validation: a bad input fails every rank alike, before any rendezvous) -----
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        for stale in (run / CKPT_DIR).glob(".step_*.tmp") if (run / CKPT_DIR).is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # temporaries of a killed checkpoint write
        write_text_atomic(run / "config.yaml", dump_yaml(cfg))
        write_file_list(heldout_file, heldout)

    # ---- data ------------------------------------------------------------------------------------------------
    # One preprocessing from here to the phone: evaluated with it, stored in the model file, copied to exports.
    pre = Preprocess.for_model(model)
    pre = Preprocess(pre.size, pre.resize, cfg.aug.interpolation, pre.mean, pre.std)
    mean, std, interpolation = pre.mean, pre.std, pre.interpolation
    a = cfg.aug
    train_tf = create_transform(
        input_size=(3, image_size, image_size),
        is_training=True,
        scale=a.scale,
        ratio=a.ratio,
        hflip=a.hflip,
        color_jitter=a.color_jitter or None,
        auto_augment=a.auto_augment,
        interpolation=interpolation,
        re_prob=a.reprob,
        re_mode=a.remode,
        mean=mean,
        std=std,
    )
    eval_tf = pre.transform()
    train_ds = ImageListDataset(data_dir, train_samples, train_tf)
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    val_loader = None
    if index.val:
        val_loader = torch.utils.data.DataLoader(
            ImageListDataset(data_dir, index.val[rank::world], eval_tf),
            batch_size=B,
            shuffle=False,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_bad,
            pin_memory=device.type == "cuda",
        )
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=a.mixup,
            cutmix_alpha=a.cutmix,
            prob=a.mixup_prob,
            switch_prob=a.mixup_switch_prob,
            mode=a.mixup_mode,
            label_smoothing=a.label_smoothing,
            num_classes=C,
        )
    objective = Objective(
        C, E, assignment, cfg.moe.router_loss_weight, cfg.moe.balance_loss_weight, a.label_smoothing
    ).to(device)
    super_of = objective.super_of

    # ---- model, optimizer, schedule --------------------------------------------------------------------------
    model.to(device)
    o = cfg.optim
    lr = o.lr if o.lr is not None else o.base_lr * cfg.batch_size / o.base_batch
    opt_kwargs: dict[str, Any] = {"eps": o.eps}
    if any(s in o.opt.lower() for s in ("adam", "lamb")):
        opt_kwargs["betas"] = tuple(o.betas)
    try:
        optimizer = create_optimizer_v2(model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, **opt_kwargs)
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.schedule.sched,
            num_epochs=cfg.schedule.epochs,
            warmup_epochs=cfg.schedule.warmup_epochs,
            warmup_lr=cfg.schedule.warmup_lr,
            min_lr=cfg.schedule.min_lr,
            step_on_epochs=False,
            updates_per_epoch=spe,
        )
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"optimizer/scheduler config: {e}") from None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None

    meta = ModelMeta(
        model=cfg.model,
        model_kwargs=kwargs,
        class_names=index.class_names,
        preprocess=pre,
        train=TrainInfo(
            data_dir=str(data_dir),
            heldout_list=str(heldout_file),
            superclasses=str(Path(cfg.moe.superclasses).absolute()) if cfg.moe.superclasses else None,
        ),
    )

    # ---- resume ----------------------------------------------------------------------------------------------
    step = 0
    if cfg.resume:
        found = find_checkpoint(run)
        if found is None:
            log.warning("--resume: no complete checkpoint in %s, starting from step 0", run / CKPT_DIR)
        else:
            ckpt_dir, state = found
            if state.get("steps_per_epoch") != spe:
                raise UserError(
                    f"{ckpt_dir}: saved with {state.get('steps_per_epoch')} steps per epoch, this config gives "
                    f"{spe} (batch size, world size or data changed); cannot resume"
                )
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(ckpt_dir / MODEL_FILE), device=str(device)))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.module.load_state_dict(state["ema"])
            step = int(state["step"])
            if main:
                log.info("resuming from %s (step %d of %d)", ckpt_dir, step, total)
    _reseed(cfg.seed, rank, step)

    fwd: nn.Module = RoutedForward(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        find_unused = is_moe if cfg.ddp_find_unused is None else cfg.ddp_find_unused
        fwd = DDP(
            fwd,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
    if cfg.compile:
        fwd = torch.compile(fwd)

    writer = None
    metrics_f = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"))
        metrics_f = open(run / "metrics.jsonl", "a")

    def emit(rec: dict[str, Any]) -> None:
        if not main:
            return
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                writer.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    def state_dict(epoch: int) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": epoch,
            "steps_per_epoch": spe,
            "total_steps": total,
            "world_size": world,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "config": config_to_dict(cfg),
        }

    def evaluate_epoch(m: nn.Module) -> dict[str, Any]:
        counts = eval_counts(m, val_loader, C, super_of=super_of, device=device, amp_dtype=amp_dtype)
        return summarize_counts(_all_reduce(counts, device, world), with_router_accuracy=super_of is not None)

    if main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "%s (%s, %.2fM params) on %d classes, %d train / %d held-out / %d val images; %d steps/epoch x %d "
            "epochs, %d steps; world %d, batch %d/rank, lr %.2e, device %s, amp %s",
            cfg.model, f"MoE E={E} K={model.top_k}" if is_moe else "dense", n_params / 1e6, C,
            len(train_samples), len(heldout), len(index.val), spe, cfg.schedule.epochs, total, world, B, lr,
            device, amp_dtype,
        )  # fmt: skip

    # ---- the loop --------------------------------------------------------------------------------------------
    model.train()
    every = cfg.checkpoint.every_n_steps
    while step < total:
        epoch = step // spe
        sampler.set_epoch(epoch)  # the epoch's order depends only on (seed, epoch): resumable mid-epoch
        order = list(sampler)
        b0 = step - epoch * spe
        batches = [order[i * B : (i + 1) * B] for i in range(b0, spe)]
        loader = torch.utils.data.DataLoader(
            train_ds,
            batch_sampler=batches,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_bad,
            pin_memory=device.type == "cuda",
        )
        ep = {  # epoch sums, all-reduced at the end of the epoch
            "loss": torch.zeros((), dtype=torch.float64),
            "steps": torch.zeros((), dtype=torch.int64),
            "images": torch.zeros((), dtype=torch.int64),
            "skipped": torch.zeros((), dtype=torch.int64),
            "router_correct": torch.zeros((), dtype=torch.int64),
        }
        if is_moe:
            ep["expert_load"] = torch.zeros(E, dtype=torch.int64)
        win: dict[str, float] = {}
        win_n, win_images, t_win = 0, 0, time.perf_counter()
        pbar = tqdm(
            total=spe,
            initial=b0,
            desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}",
            disable=None if main else True,
            leave=False,
        )
        batch_iter = iter(loader)  # draws a seed from the global RNG: re-seed after it, as after every step
        _reseed(cfg.seed, rank, step)
        for images, targets, n_bad in batch_iter:
            ep["skipped"] += n_bad
            if mixup is not None and len(targets) % 2:  # mixup pairs images: it needs an even batch
                images, targets = images[:-1], targets[:-1]
            zero = len(targets) == 0
            if zero and world == 1:
                log.warning("step %d: every image of the batch was unreadable; step skipped", step + 1)
            else:
                if zero:  # DDP peers wait for this rank's gradients: contribute zeros
                    images = torch.zeros(2, 3, image_size, image_size)
                    targets = torch.zeros(2, dtype=torch.long)
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                scheduler.step_update(num_updates=step)
                parts = train_step(
                    fwd, optimizer, images, targets, objective, mixup, amp_dtype, scaler, o.clip_grad, zero
                )
                if ema is not None:
                    ema.update(model, step=step)
                if not zero:
                    ep["steps"] += 1
                    ep["images"] += len(targets)
                    ep["loss"] += parts["loss"].double().cpu()
                    if "router_correct" in parts:
                        ep["router_correct"] += parts["router_correct"].cpu()
                    if is_moe:
                        ep["expert_load"] += parts["expert_load"].cpu()
                    for k, v in parts.items():
                        if v.ndim == 0 and k != "router_correct":
                            win[k] = win.get(k, 0.0) + float(v)
                    if "router_correct" in parts:
                        win["router_acc"] = win.get("router_acc", 0.0) + float(parts["router_correct"]) / len(
                            targets
                        )
                    win_n += 1
                    win_images += len(targets)
            step += 1
            _reseed(cfg.seed, rank, step)  # randomness of step s+1 depends only on s: a resumed run matches
            pbar.update(1)
            if step % cfg.log_interval == 0 or step == total:
                dt = time.perf_counter() - t_win
                rec = {"kind": "train", "step": step, "epoch": epoch + (step - epoch * spe) / spe}
                rec.update({k: v / max(win_n, 1) for k, v in win.items()})
                rec.update(
                    lr=optimizer.param_groups[0]["lr"], images_per_s=win_images * world / max(dt, 1e-9)
                )
                rec["skipped"] = int(ep["skipped"])
                emit(rec)
                if main:
                    pbar.set_postfix(loss=f"{rec.get('loss', float('nan')):.3f}")
                win, win_n, win_images, t_win = {}, 0, 0, time.perf_counter()
            epoch_end = step % spe == 0
            if main and (step == total or (every and step % every == 0 and not epoch_end)):
                _save_checkpoint(run, step, model, meta, state_dict(epoch), cfg.checkpoint.keep_last)
            if step >= total:
                break
        pbar.close()

        # ---- end of epoch (or of a max_steps run): metrics, evaluation, checkpoint ---------------------------
        ep = _all_reduce(ep, device, world)
        rec = {
            "kind": "epoch",
            "step": step,
            "epoch": step / spe,
            "train_loss": float(ep["loss"]) / max(int(ep["steps"]), 1),
        }
        rec["train_skipped"] = int(ep["skipped"])
        if is_moe:
            rec["train_expert_load"] = ep["expert_load"].tolist()
            if super_of is not None:
                rec["train_router_acc"] = float(ep["router_correct"]) / max(int(ep["images"]), 1)
        if val_loader is not None:
            v = evaluate_epoch(model)
            rec.update(val_top1=v["top1"], val_top5=v["top5"], val_loss=v["loss"], val_skipped=v["skipped"])
            if is_moe:
                rec["val_expert_load"] = v["expert_load"]
                if v.get("router_accuracy") is not None:
                    rec["val_router_acc"] = v["router_accuracy"]
            if ema is not None:
                ve = evaluate_epoch(ema.module)
                rec.update(ema_val_top1=ve["top1"], ema_val_top5=ve["top5"])
        emit(rec)
        if main:
            log.info(
                "epoch %.2f step %d: %s", step / spe, step,
                ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k not in ("kind", "step", "epoch")),
            )  # fmt: skip
            if step % spe == 0:
                _save_checkpoint(run, step, model, meta, state_dict(step // spe), cfg.checkpoint.keep_last)

    # ---- final weights ---------------------------------------------------------------------------------------
    final_model = ema.module if ema is not None else model
    if main:
        meta.train.ema = ema is not None
        meta.train.step = step
        save_model(run / MODEL_FILE, final_model, meta)
        writer.close()
        metrics_f.close()
        log.info("wrote %s", run / MODEL_FILE)
    elif cfg.dump_replicas:
        save_model(run / f"replica_rank{rank}.safetensors", model, meta)
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return run


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = load_config(args.config, args.overrides)
    if args.model:
        cfg.model = args.model
    if args.data and args.dataset:
        raise UserError("pass either --data DIR or --dataset NAME, not both")
    if args.data or args.dataset:
        cfg.data.spec = args.data or args.dataset
    if args.superclasses:
        cfg.moe.superclasses = args.superclasses
    if args.epochs is not None:
        cfg.schedule.epochs = args.epochs
    if args.out:
        cfg.out = args.out
    if args.resume:
        cfg.resume = True
    run = train(cfg)
    if _dist_env()[0] == 0:
        print(run)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from .config import list_presets

    p = sub.add_parser(
        "train",
        help="train a dense ViT or a Mobile V-MoE (DDP with torchrun)",
        description="Train with a preset or YAML config plus key=value overrides (e.g. optim.lr=1e-3).",
    )
    p.add_argument("--config", required=True, help=f"preset ({', '.join(list_presets())}) or YAML file")
    p.add_argument("--model", default=None, help="timm model name, e.g. mobile_vmoe_tiny_patch16_224")
    p.add_argument("--data", default=None, help="ImageFolder dataset directory")
    p.add_argument("--dataset", choices=("synthetic", "digits"), default=None, help="built-in dataset")
    p.add_argument("--superclasses", default=None, help="superclasses.json: super-class router loss (MoE)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.set_defaults(func=_cli)
