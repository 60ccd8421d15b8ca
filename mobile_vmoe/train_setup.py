"""Set-up of a training run (``mobile_vmoe.train``): where it runs, the data, the model, the recipe, DDP.

Everything here validates its input and raises ``UserError`` before any training; nothing here writes the run
directory (``train_run`` does).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import ModelMeta, TrainInfo
from .common import UserError
from .config import Config, model_kwargs
from .data import DatasetIndex, Sample
from .evaluate import routed_forward
from .files.superclass_map import read_superclass_map
from .models.names import classifier_models, image_text_models
from .preprocess import Preprocess

log = logging.getLogger(__name__)

__all__ = [
    "Env",
    "Data",
    "Loaders",
    "Recipe",
    "RoutedForward",
    "make_env",
    "prepare_data",
    "build_model",
    "build_loaders",
    "build_recipe",
    "epoch_loader",
    "optimizer_step",
    "init_process_group",
    "wrap_model",
    "reseed",
]


# ---------------------------------------------------------------------------------------------------------------
# Where it runs
# ---------------------------------------------------------------------------------------------------------------


class Env(NamedTuple):
    """This process's place in the run: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, device and autocast dtype."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def main(self) -> bool:
        return self.rank == 0


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


def make_env(cfg: Config, image_text: bool = False) -> Env:
    """The process's environment, after the config checks that need no data (model name, batch, ...);
    ``image_text``: the run trains an image-text model (``train_image_text``)."""
    import mobile_vmoe.models  # noqa: F401  (registers the model names)

    from .captions import is_caption_source

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg, local_rank)
    env = Env(rank, world, local_rank, device, _amp_dtype(cfg, device))
    if cfg.model not in (image_text_models() if image_text else classifier_models()):
        families = (
            "mobile_limoe_* / mobile_onetower_* / mobile_clip_*"
            if image_text
            else "mobile_vit_* / mobile_vmoe_*"
        )
        raise UserError(f"config key model: {cfg.model!r} is not a {families} model")
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} must be a positive multiple of the world size {world}")
    if cfg.log_interval < 1:
        raise UserError(f"config key log_interval must be >= 1, got {cfg.log_interval}")
    if cfg.schedule.epochs < 1:
        raise UserError(f"config key schedule.epochs must be >= 1, got {cfg.schedule.epochs}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise UserError(
            f"config key data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}"
        )
    if not cfg.data.spec:
        builtin = "synthetic-captions" if image_text else "synthetic|digits"
        raise UserError(f"no dataset: pass --data DIR or --dataset {builtin} (config key data.spec)")
    if not image_text and is_caption_source(cfg.data.spec):
        raise UserError(
            f"data.spec {cfg.data.spec!r} is a caption set; {cfg.model} is an image classifier and trains on an "
            "image folder (DIR/train/<class>/...); caption sets train the image-text models (mobile_limoe_*, "
            "mobile_onetower_*, mobile_clip_*)"
        )
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return env


# Process groups this process has joined: the pipeline trains several in turn.
_GROUPS_JOINED = itertools.count()


def init_process_group(env: Env) -> None:
    """Join the DDP process group (torchrun), NCCL on CUDA, gloo on CPU.

    A pipeline joins one group per training, each destroyed at its end (``train_run.finish_run``). torchrun's
    store outlives them and still holds the previous group's rendezvous keys (each rank's address), which a new
    group under the same key prefix would read before the other rank has replaced them: each group gets a prefix
    of its own (the n-th group of every rank is the same training)."""
    if env.world > 1 and not dist.is_initialized():
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"mobile_vmoe_group{next(_GROUPS_JOINED)}", store)
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world)


def reseed(seed: int, rank: int, step: int) -> None:
    """All randomness of step s+1 (augmentation, mixup, drop path) from (seed, rank, s): resumable exactly."""
    s = (seed * 1_000_003 + rank * 10_007 + step) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The dataset as this run splits and steps through it (B: images per rank and step)."""

    data_dir: Path
    index: DatasetIndex
    train_samples: list[Sample]  # train/ minus the held-out split
    heldout: list[Sample]  # RUN/heldout.txt: never trained on
    batch: int  # B
    steps_per_epoch: int
    total_steps: int

    @property
    def num_classes(self) -> int:
        return len(self.index.class_names)


def _dataset_dir(cfg: Config) -> Path:
    from .data import BUILTIN, prepare_dataset

    if cfg.data.spec not in BUILTIN:  # a preset's generator options do not apply to the user's own data
        return prepare_dataset(cfg.data.spec).absolute()
    kwargs = dict(cfg.data.dataset_kwargs)
    seed = int(kwargs.pop("seed", 0))
    return prepare_dataset(cfg.data.spec, root=cfg.data.root, seed=seed, **kwargs).absolute()


def _check_images(data_dir: Path, train_samples: list[Sample], heldout: list[Sample], cfg: Config) -> None:
    """Refuse a dataset with too many unreadable images before training (``data.check_images``, where present)."""
    try:
        from .data import check_images
    except ImportError:  # an older data module without the check: the loop still refuses an unreadable epoch
        return
    check_images(data_dir, train_samples + heldout, cfg.data.max_bad_fraction)


def prepare_data(cfg: Config, env: Env) -> Data:
    """Dataset directory (built-in datasets are built), class folders, held-out split and steps per epoch."""
    from .data import heldout_split, scan_dataset

    data_dir = _dataset_dir(cfg)
    index = scan_dataset(data_dir)
    want_C = model_kwargs(cfg).get("num_classes")
    if want_C is not None and want_C != len(index.class_names):
        raise UserError(
            f"{data_dir / 'train'}: {len(index.class_names)} class folders, but model_kwargs.num_classes="
            f"{want_C}; fix the data or drop num_classes to take it from the data"
        )
    train_samples, heldout = heldout_split(
        index.train, cfg.data.heldout_fraction, cfg.data.heldout_min_per_class, seed=cfg.seed
    )
    B = cfg.batch_size // env.world
    spe = math.ceil(len(train_samples) / env.world) // B  # DistributedSampler pads; drop_last: full batches
    if spe == 0:
        raise UserError(
            f"{len(train_samples)} training images (after the held-out split) are fewer than one batch of "
            f"{B} per rank; lower batch_size"
        )
    if env.main:  # reading every image once is the main process's job; a failure ends the other ranks
        _check_images(data_dir, train_samples, heldout, cfg)
        if not index.val:
            log.warning("%s has no val/ images: no per-epoch evaluation", data_dir)
    total = spe * cfg.schedule.epochs
    if cfg.schedule.max_steps:
        total = min(total, cfg.schedule.max_steps)
    return Data(data_dir, index, train_samples, heldout, B, spe, total)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def _superclass_assignment(cfg: Config, model: nn.Module, class_names: list[str]) -> list[int] | None:
    path = cfg.moe.superclasses
    if not path:
        return None
    if not getattr(model, "is_moe", False):
        raise UserError(
            f"moe.superclasses ({path}) is given but {cfg.model} is a dense model; use a mobile_vmoe_* model"
        )
    sc = read_superclass_map(path, class_names)
    if sc.num_superclasses != model.num_experts:
        S = sc.num_superclasses
        raise UserError(
            f"{path}: {S} super-classes, but {cfg.model} has E={model.num_experts} experts; the super-class "
            f"router loss needs E == S (set moe_kwargs.num_experts={S})"
        )
    return sc.assignment


def build_model(cfg: Config, data: Data, run: Path) -> tuple[nn.Module, ModelMeta, list[int] | None]:
    """The model (same initial weights on every rank, then ``init_from`` weights if given), the metadata its
    files will carry, and the super-class of each class (None without a map)."""
    kwargs = {**model_kwargs(cfg), "num_classes": data.num_classes}
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
    if cfg.init_from:  # before DDP and the optimizer: every rank starts from the same given weights
        from .models.init_from import init_from

        init_from(model, cfg.init_from)
    assignment = _superclass_assignment(cfg, model, data.index.class_names)
    # One preprocessing from here to the phone: evaluated with it, stored in the model file, copied to exports.
    pre = Preprocess.for_model(model)
    pre = Preprocess(pre.size, pre.resize, cfg.aug.interpolation, pre.mean, pre.std)
    absolute = lambda p: str(Path(p).absolute()) if p else None  # noqa: E731
    meta = ModelMeta(
        model=cfg.model,
        model_kwargs=kwargs,
        class_names=data.index.class_names,
        preprocess=pre,
        train=TrainInfo(
            data_dir=str(data.data_dir),
            heldout_list=str(run / "heldout.txt"),
            superclasses=absolute(cfg.moe.superclasses),
            init_from=absolute(cfg.init_from),
        ),
    )
    return model, meta, assignment


class RoutedForward(nn.Module):
    """``forward(x) -> (logits, routing or None)``. DDP hooks run only for the wrapped module's ``forward``, so
    the training forward must be this module's forward, not a call to ``model.forward_with_routing``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return routed_forward(self.model, x)


def wrap_model(model: nn.Module, cfg: Config, env: Env, forward: nn.Module | None = None) -> nn.Module:
    """The training forward (``forward`` around ``model``, default RoutedForward), in DDP when world > 1,
    compiled when ``compile``."""
    fwd: nn.Module = forward if forward is not None else RoutedForward(model)
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # An expert that gets no image in a step has no gradient on that rank (see mobile_vmoe.train).
        find_unused = getattr(model, "is_moe", False) if cfg.ddp_find_unused is None else cfg.ddp_find_unused
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        fwd = DDP(fwd, device_ids=device_ids, find_unused_parameters=find_unused)
    return torch.compile(fwd) if cfg.compile else fwd


# ---------------------------------------------------------------------------------------------------------------
# Loaders and recipe
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Loaders:
    train: torch.utils.data.Dataset
    sampler: torch.utils.data.DistributedSampler
    val: torch.utils.data.DataLoader | None  # this rank's share of val/, None without val images
    mixup: Any  # timm Mixup or None


def build_loaders(cfg: Config, data: Data, pre: Preprocess, env: Env) -> Loaders:
    from timm.data import Mixup, create_transform

    from .data import ImageListDataset, collate_skip_bad

    a = cfg.aug
    train_tf = create_transform(
        input_size=(3, pre.size, pre.size),
        is_training=True,
        scale=a.scale,
        ratio=a.ratio,
        hflip=a.hflip,
        color_jitter=a.color_jitter or None,
        auto_augment=a.auto_augment,
        interpolation=pre.interpolation,
        re_prob=a.reprob,
        re_mode=a.remode,
        mean=pre.mean,
        std=pre.std,
    )
    train_ds = ImageListDataset(data.data_dir, data.train_samples, train_tf, cache=cfg.data.cache_images)
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    val = None
    if data.index.val:
        val = torch.utils.data.DataLoader(
            ImageListDataset(
                data.data_dir,
                data.index.val[env.rank :: env.world],
                pre.transform(),
                cache=cfg.data.cache_images,
            ),
            batch_size=data.batch,
            shuffle=False,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_bad,
            pin_memory=env.device.type == "cuda",
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
            num_classes=data.num_classes,
        )
    return Loaders(train_ds, sampler, val, mixup)


def epoch_loader(
    cfg: Config,
    loaders: Any,
    steps_per_epoch: int,
    batch: int,
    env: Env,
    step: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> torch.utils.data.DataLoader:
    """The batches of the epoch holding ``step``, from that step on: the epoch's order depends only on
    (seed, epoch), so a run resumed mid-epoch sees the images it would have seen. ``loaders`` has ``train``
    and a ``sampler``; ``collate_fn`` defaults to the classifier's (bad images skipped)."""
    from .data import collate_skip_bad

    epoch, b0 = divmod(step, steps_per_epoch)
    loaders.sampler.set_epoch(epoch)
    order = list(loaders.sampler)
    return torch.utils.data.DataLoader(
        loaders.train,
        batch_sampler=[order[i * batch : (i + 1) * batch] for i in range(b0, steps_per_epoch)],
        num_workers=cfg.data.num_workers,
        collate_fn=collate_fn or collate_skip_bad,
        pin_memory=env.device.type == "cuda",
    )


def optimizer_step(
    fwd: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    scaler: Any = None,
    clip_grad: float | None = None,
    zero_batch: bool = False,
) -> None:
    """Backward and step, with the AMP scaler and gradient clipping when set. ``zero_batch``: this rank has no
    sample but DDP peers do: the loss counts zero, so the gradient all-reduce still happens."""
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


@dataclass
class Recipe:
    """What an optimizer step uses besides the model; restored from a checkpoint on resume."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm scheduler, stepped every update: the lr is a function of (config, step)
    scaler: torch.amp.GradScaler | None  # fp16 only
    ema: Any  # timm ModelEmaV3 or None
    lr: float


def build_recipe(cfg: Config, model: nn.Module, data: Data, env: Env) -> Recipe:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

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
            updates_per_epoch=data.steps_per_epoch,
        )
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"optimizer/scheduler config: {e}") from None
    scaler = torch.amp.GradScaler(env.device.type) if env.amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    return Recipe(optimizer, scheduler, scaler, ema, lr)
