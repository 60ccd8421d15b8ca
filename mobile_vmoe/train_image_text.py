"""`mobile-vmoe train` of an image-text model: contrastive training of LIMoE, its dense one-tower twin and the
two-tower CLIP on a caption set.

    mobile-vmoe train --config limoe_synthetic [--model mobile_clip_nano_patch8_32] [k=v ...]
    torchrun --nproc-per-node 8 -m mobile_vmoe.cli train --config limoe_tiny --data /captions

``train.train`` hands a run over here when ``cfg.model`` is an image-text model. The loop is the classifier
loop's (``train``), with the same pieces: run-directory lock, config and resume rules (``train_run``), DDP,
re-seeding and the optimizer / scheduler / EMA recipe (``train_setup``), metric records (``train_metrics``).

Decisions:
- Data: a caption set (``captions``; ``data.spec`` a built-in set, a table, shards or a folder). The built-in
  layout's ``train`` split is trained on and its ``val`` split evaluated each epoch; a single source is trained
  on whole, without per-epoch evaluation. A classifier dataset is refused before any work.
- Loss (``models.limoe_losses.ContrastiveObjective``): open_clip's ClipLoss (negatives gathered from every DDP
  rank, with their gradients) + LIMoE's local and global entropy losses per modality (``image_text.*``;
  ``image_text.entropy_losses=false`` is the "LIMoE without entropy losses" baseline) + V-MoE's importance and
  load losses (``moe.importance_loss_weight`` / ``moe.load_loss_weight``).
- DDP: the gathered similarity matrix needs the same batch on every rank, so a batch that lost unreadable
  images is cut to the shortest rank's length (a step where every image of some rank is gone is trained with
  weight zero on every rank). MoE experts that get no token on a rank have no gradient: as for the V-MoE,
  ``find_unused_parameters`` is on for a LIMoE.
- Per-epoch evaluation (main rank, over the whole val split): zero-shot top-1/top-5, retrieval recall@1 and
  the routing success rate per modality, as ``mobile-vmoe eval`` computes them (``evaluate_image_text``).
- Final weights: RUN/model.safetensors with the caption set's class names and prompt templates in its
  metadata (zero-shot export reads them); EMA weights when ``ema`` is on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from torch import nn

from .captions import CaptionSet, ImageTextDataset, caption_splits, collate_image_text, read_caption_set
from .checkpoint import ModelMeta, TrainInfo
from .common import UserError
from .config import Config, config_to_dict, model_kwargs
from .evaluate_image_text import image_text_metrics, pair_loader
from .files.captions import CaptionColumns
from .models.limoe_losses import CLASSIC_LOSSES, ContrastiveObjective
from .preprocess import Preprocess
from .text import Tokenizer
from .train_metrics import EpochSums, MetricsLog, Window
from .train_run import (
    check_out,
    check_run_dir,
    finish_run,
    locked,
    newest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    write_run_files,
)
from .train_setup import (
    Env,
    Recipe,
    build_recipe,
    epoch_loader,
    init_process_group,
    make_env,
    optimizer_step,
    reseed,
    wrap_model,
)

log = logging.getLogger(__name__)

__all__ = [
    "CaptionData",
    "PairForward",
    "check_image_text_config",
    "prepare_captions",
    "train_image_text",
    "train_step",
]


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------


def check_image_text_config(cfg: Config) -> None:
    """The image_text keys, before any data is read."""
    it = cfg.image_text
    for key in ("local_entropy_weight", "global_entropy_weight", "global_entropy_experts"):
        if any(v < 0 for v in getattr(it, key)):
            raise UserError(
                f"config key image_text.{key} must be >= 0 (image, text), got {list(getattr(it, key))}"
            )
    if any(0 < s < 1 for s in it.global_entropy_experts):
        S = list(it.global_entropy_experts)
        raise UserError(f"config key image_text.global_entropy_experts: S must be 0 (S = E) or >= 1, got {S}")
    if it.eval_batch_size < 1:
        raise UserError(f"config key image_text.eval_batch_size must be >= 1, got {it.eval_batch_size}")


@dataclass
class CaptionData:
    """The caption set as this run steps through it (B: pairs per rank and step)."""

    data_dir: Path  # the caption set (a built-in set's folder, or the given source)
    train: CaptionSet
    val: CaptionSet | None  # the built-in layout's val split; None for a single source
    builtin: bool
    batch: int  # B
    steps_per_epoch: int
    total_steps: int


def _caption_source(cfg: Config) -> tuple[Path, bool]:
    """(the caption set's folder or file, whether it is built in): a classifier dataset is refused."""
    from .builtin_captions import BUILTIN_CAPTIONS, prepare_caption_set
    from .captions import is_caption_source
    from .data import BUILTIN

    spec = cfg.data.spec
    usage = (
        f"{cfg.model} is an image-text model and trains on image-caption pairs: --dataset synthetic-captions, "
        "or --data a caption table (.csv/.tsv), WebDataset shards (.tar) or a folder of them (docs/FILES.md)"
    )
    if spec in BUILTIN or (
        Path(spec).is_dir() and (Path(spec) / "train").is_dir() and not is_caption_source(spec)
    ):
        raise UserError(f"data.spec {spec!r} is an image-classification dataset; {usage}")
    if spec in BUILTIN_CAPTIONS:
        kwargs = dict(cfg.data.dataset_kwargs)
        seed = int(kwargs.pop("seed", 0))
        return prepare_caption_set(spec, cfg.data.root, seed, **kwargs).absolute(), True
    if not Path(spec).exists():
        raise UserError(f"caption set not found: {spec}; {usage}")
    if not is_caption_source(spec):
        raise UserError(f"data.spec {spec!r} is not a caption set; {usage}")
    return Path(spec).absolute(), False


def prepare_captions(cfg: Config, env: Env) -> CaptionData:
    """The caption set (a built-in one is built), its train / val splits, and the steps per epoch."""
    d, builtin = _caption_source(cfg)
    it = cfg.image_text
    columns = CaptionColumns(it.csv_img_key, it.csv_caption_key, it.csv_label_key)
    splits = caption_splits(d)
    # a user's images are decoded once here (bad ones skipped and counted); the built-in ones are ours
    read = lambda p: read_caption_set(p, columns, it.csv_separator, not builtin, cfg.data.max_bad_fraction)  # noqa: E731
    train = read(splits[0])
    val = read(splits[1]) if len(splits) > 1 else None
    if env.main:
        log.info("%s", "\n".join(cs.describe() for cs in (train, val) if cs is not None))
        if val is None:
            log.warning("%s has no val split: no per-epoch evaluation", d)
    B = cfg.batch_size // env.world
    spe = math.ceil(len(train) / env.world) // B  # DistributedSampler pads; full batches only
    if spe == 0:
        raise UserError(
            f"{len(train)} training pairs are fewer than one batch of {B} per rank; lower batch_size"
        )
    total = spe * cfg.schedule.epochs
    if cfg.schedule.max_steps:
        total = min(total, cfg.schedule.max_steps)
    return CaptionData(d, train, val, builtin, B, spe, total)


def _build_model(cfg: Config, data: CaptionData) -> tuple[nn.Module, ModelMeta]:
    """The model (the same initial weights on every rank) and the metadata of its files."""
    kwargs = model_kwargs(cfg)
    if cfg.data.image_size and kwargs.setdefault("img_size", cfg.data.image_size) != cfg.data.image_size:
        raise UserError(
            f"data.image_size={cfg.data.image_size} but model_kwargs.img_size={kwargs['img_size']}"
        )
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(cfg.model, drop_path_rate=cfg.aug.drop_path, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {cfg.model} with model_kwargs {kwargs}: {e}") from None
    if cfg.init_from:
        from .models.init_from import init_from

        init_from(model, cfg.init_from)
    pre = Preprocess.for_model(model)
    classes = data.train.classes
    meta = ModelMeta(
        model=cfg.model,
        model_kwargs=kwargs,
        class_names=list(classes.class_names) if classes else [],
        preprocess=Preprocess(pre.size, pre.resize, cfg.aug.interpolation, pre.mean, pre.std),
        train=TrainInfo(
            data_dir=str(data.data_dir),
            init_from=str(Path(cfg.init_from).absolute()) if cfg.init_from else None,
        ),
        prompt_templates=list(classes.templates) if classes else [],
    )
    return model, meta


def _objective(cfg: Config, model: nn.Module, env: Env) -> ContrastiveObjective:
    it = cfg.image_text
    E = model.num_experts if model.is_moe else 0
    if E and any(s > E for s in it.global_entropy_experts):
        raise UserError(
            f"config key image_text.global_entropy_experts: S must be at most the E={E} experts of {cfg.model} "
            f"(0: S = E), got {list(it.global_entropy_experts)}"
        )
    if it.classic_losses not in CLASSIC_LOSSES:
        raise UserError(
            f"config key image_text.classic_losses: expected one of {', '.join(CLASSIC_LOSSES)}, got "
            f"{it.classic_losses!r}"
        )
    on = it.entropy_losses
    S = tuple(s or max(E, 1) for s in it.global_entropy_experts) if E else None
    return ContrastiveObjective(
        E, it.local_entropy_weight if on else 0.0, it.global_entropy_weight if on else 0.0, S,  # type: ignore[arg-type]
        cfg.moe.importance_loss_weight, cfg.moe.load_loss_weight, env.rank, env.world, it.classic_losses,
    )  # fmt: skip


class PairForward(nn.Module):
    """``forward(images, tokens) -> (ImageTextOutput, routings)``: DDP hooks run for the wrapped module's
    forward only, so the training forward is this one, not a call to ``forward_with_routing``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[Any, list[Any]]:
        return self.model.forward_with_routing(images, tokens)


@dataclass
class _Loaders:
    train: ImageTextDataset
    sampler: torch.utils.data.DistributedSampler
    val: torch.utils.data.DataLoader | None  # main rank only: the whole val split


def _loaders(cfg: Config, data: CaptionData, pre: Preprocess, tokenizer: Tokenizer, env: Env) -> _Loaders:
    from timm.data import create_transform

    a = cfg.aug
    train_tf = create_transform(
        input_size=(3, pre.size, pre.size), is_training=True, scale=a.scale, ratio=a.ratio, hflip=a.hflip,
        color_jitter=a.color_jitter or None, auto_augment=a.auto_augment, interpolation=pre.interpolation,
        re_prob=a.reprob, re_mode=a.remode, mean=pre.mean, std=pre.std,
    )  # fmt: skip
    train = ImageTextDataset(data.train, tokenizer, train_tf, cache=cfg.data.cache_images)
    sampler = torch.utils.data.DistributedSampler(
        train, num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    val = None
    if data.val is not None and env.main:
        val = pair_loader(data.val, tokenizer, pre.transform(), cfg.image_text.eval_batch_size,
                          cfg.data.num_workers, cache=cfg.data.cache_images)  # fmt: skip
    return _Loaders(train, sampler, val)


# ---------------------------------------------------------------------------------------------------------------
# A step
# ---------------------------------------------------------------------------------------------------------------


def train_step(
    fwd: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    tokens: torch.Tensor,
    objective: ContrastiveObjective,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
    clip_grad: float | None = None,
    zero_batch: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch of pairs; returns the detached loss parts. ``zero_batch``: a dummy batch
    trained with weight zero, so that DDP's collectives still happen."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out, routings = fwd(images, tokens)
    loss, parts = objective(out, routings)
    optimizer_step(fwd, optimizer, loss, scaler, clip_grad, zero_batch)
    return parts


def _even_batch(
    images: torch.Tensor, tokens: torch.Tensor, env: Env, size: int, tokenizer: Tokenizer
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The batch on the device, cut to the shortest rank's length (the gathered logits need equal batches), and
    whether it is empty (then a dummy batch of 2 pairs)."""
    n = torch.tensor(len(tokens), device=env.device)
    if env.world > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    images, tokens = images[: int(n)], tokens[: int(n)]
    zero = int(n) == 0
    if zero:
        images, tokens = torch.zeros(2, 3, size, size), tokenizer(["", ""]).tokens
    return images.to(env.device, non_blocking=True), tokens.to(env.device, non_blocking=True), zero


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the loop carries from set-up to the end."""

    cfg: Config
    env: Env
    data: CaptionData
    model: nn.Module
    meta: ModelMeta
    tokenizer: Tokenizer
    loaders: _Loaders
    objective: ContrastiveObjective
    recipe: Recipe
    fwd: nn.Module
    metrics: MetricsLog
    dir: Path


def train_image_text(cfg: Config) -> Path:
    """Train the image-text model ``cfg.model`` on a caption set; returns the run directory."""
    env = make_env(cfg, image_text=True)
    check_image_text_config(cfg)
    cfg.out = cfg.out or str(Path("runs") / f"{cfg.name}-{cfg.model}")
    run = Path(cfg.out).absolute()
    check_out(run)
    data = prepare_captions(cfg, env)
    model, meta = _build_model(cfg, data)
    objective = _objective(cfg, model, env)  # a bad S fails here, before the run directory is touched
    with contextlib.ExitStack() as stack:
        stack.enter_context(locked(run, env.main))
        changes = check_run_dir(run, cfg, [], data.data_dir)
        if env.main:
            for key, (old, new) in changes.items():
                log.info("resume changes %s: %r -> %r", key, old, new)
            write_run_files(run, cfg, [])  # config.yaml; heldout.txt stays empty (no held-out split)
        init_process_group(env)
        model.to(env.device)
        tokenizer = Tokenizer(model.context_length)
        loaders = _loaders(cfg, data, meta.preprocess, tokenizer, env)
        recipe = build_recipe(cfg, model, data, env)  # type: ignore[arg-type]  (reads steps_per_epoch only)
        step, resumed_sums = _resume(run, model, recipe, data, env) if cfg.resume else (0, None)
        fwd = wrap_model(model, cfg, env, PairForward(model))
        metrics = stack.enter_context(MetricsLog(run, env.main))
        r = _Run(cfg, env, data, model, meta, tokenizer, loaders, objective, recipe, fwd, metrics, run)
        _log_start(r)
        model.train()
        while step < data.total_steps:
            step = _epoch(r, step, resumed_sums)
            resumed_sums = None
        finish_run(run, model, recipe.ema.module if recipe.ema is not None else None, meta, env.rank, env.world,
                   step, cfg.dump_replicas)  # fmt: skip
    return run


def _epoch(r: _Run, step: int, resumed_sums: Any) -> int:
    """The rest of the epoch holding ``step``: its steps, checkpoints and end-of-epoch record; the new step."""
    cfg, env, data, recipe = r.cfg, r.env, r.data, r.recipe
    spe, total, every = data.steps_per_epoch, data.total_steps, cfg.checkpoint.every_n_steps
    sums = EpochSums(0, resumed_sums if env.main and step % spe else None)
    window = Window()
    batches = iter(
        epoch_loader(cfg, r.loaders, data.steps_per_epoch, data.batch, env, step, collate_image_text)
    )
    reseed(cfg.seed, env.rank, step)  # iter() drew a seed from the global RNG
    for images, tokens, n_bad in batches:
        sums.skip(n_bad)
        images, tokens, zero = _even_batch(images, tokens, env, r.meta.preprocess.size, r.tokenizer)
        if zero and env.world == 1:
            log.warning("step %d: every image of the batch was unreadable; step skipped", step + 1)
        else:
            recipe.scheduler.step_update(num_updates=step)
            parts = train_step(r.fwd, recipe.optimizer, images, tokens, r.objective, env.amp_dtype,
                               recipe.scaler, cfg.optim.clip_grad, zero)  # fmt: skip
            if recipe.ema is not None:
                recipe.ema.update(r.model, step=step)
            if not zero:
                sums.add(parts, len(tokens))
                window.add(parts, len(tokens))
        step += 1
        reseed(cfg.seed, env.rank, step)  # step s+1's randomness depends on s only: resumable exactly
        if step % cfg.log_interval == 0 or step == total:
            rec = window.record(step, spe, recipe.optimizer.param_groups[0]["lr"], env.world, sums.skipped)
            r.metrics.emit(rec, log_line=True)
        if step % spe and (step == total or (every and step % every == 0)):  # a mid-epoch checkpoint
            so_far = sums.reduced(env.device, env.world)  # a collective: every rank takes part
            if env.main:
                save_checkpoint(
                    r.dir, step, r.model, r.meta, _state(step, r, so_far), cfg.checkpoint.keep_last
                )
        if step >= total:
            break
    sums = sums.reduced(env.device, env.world)
    if sums.images == 0:
        raise UserError(
            f"{data.data_dir}: no training image of epoch {step // spe} could be read; nothing was trained"
        )
    rec = sums.record(step, spe, with_router=False)
    rec.update(_evaluate(r))
    r.metrics.emit(rec)
    if env.main and step % spe == 0:
        save_checkpoint(r.dir, step, r.model, r.meta, _state(step, r, None), cfg.checkpoint.keep_last)
    return step


def _state(step: int, r: _Run, sums: EpochSums | None) -> dict[str, Any]:
    """state.pt of a checkpoint (tensors and plain values only: it loads with weights_only=True)."""
    rc = r.recipe
    return {
        "step": step,
        "epoch": step // r.data.steps_per_epoch,
        "steps_per_epoch": r.data.steps_per_epoch,
        "total_steps": r.data.total_steps,
        "world_size": r.env.world,
        "optimizer": rc.optimizer.state_dict(),
        "scaler": rc.scaler.state_dict() if rc.scaler is not None else None,
        "ema": rc.ema.module.state_dict() if rc.ema is not None else None,
        "epoch_sums": sums.state() if sums is not None else None,
        "config": config_to_dict(r.cfg),
    }


def _resume(run: Path, model: nn.Module, recipe: Recipe, data: CaptionData, env: Env) -> tuple[int, Any]:
    """Restore the newest readable checkpoint: (its step, the epoch's sums so far or None)."""
    ck = newest_checkpoint(run, move_damaged=env.main)
    if ck is None:
        log.warning("--resume: no complete checkpoint in %s, starting from step 0", run)
        return 0, None
    restore_checkpoint(ck, model, recipe, data.steps_per_epoch)
    if env.main:
        log.info("resuming from %s (step %d of %d)", ck.dir, ck.state["step"], data.total_steps)
    return ck.state["step"], ck.state.get("epoch_sums")


def _evaluate(r: _Run) -> dict[str, Any]:
    """Zero-shot, retrieval and routing on the val split (main rank; {} elsewhere or without val)."""
    val = r.data.val
    if r.loaders.val is None or val is None:
        return {}
    classes = val.classes or r.data.train.classes
    names, templates = (classes.class_names, classes.templates) if classes else ((), ())

    def metrics(m: nn.Module) -> Any:
        return image_text_metrics(m, val, r.loaders.val, r.env.device, names, templates)

    zs, ret, routing, skipped = metrics(r.model)
    rec: dict[str, Any] = {"val_i2t_r1": ret.image_to_text_r1, "val_t2i_r1": ret.text_to_image_r1}
    if zs is not None:
        rec.update(val_zero_shot_top1=zs.top1, val_zero_shot_top5=zs.top5)
    if routing is not None:
        rec.update(val_image_success=routing.image_success, val_text_success=routing.text_success,
                   val_image_experts_used=routing.image_experts_used,
                   val_text_experts_used=routing.text_experts_used)  # fmt: skip
    if r.recipe.ema is not None:
        ema_zs = metrics(r.recipe.ema.module)[0]
        if ema_zs is not None:
            rec["ema_val_zero_shot_top1"] = ema_zs.top1
    rec["val_skipped"] = skipped
    return rec


def _log_start(r: _Run) -> None:
    if not r.env.main:
        return
    m, d = r.model, r.data
    kind = (
        f"LIMoE E={m.num_experts} K={m.top_k}" if m.is_moe else ("two-tower" if m.two_tower else "one-tower")
    )
    log.info(
        "%s (%s, %.2fM params) on %d train / %s val pairs; %d steps/epoch x %d epochs, %d steps; world %d, "
        "batch %d/rank, lr %.2e, device %s, amp %s",
        r.cfg.model, kind, sum(p.numel() for p in m.parameters()) / 1e6, len(d.train),
        len(d.val) if d.val is not None else "no", d.steps_per_epoch, r.cfg.schedule.epochs, d.total_steps,
        r.env.world, d.batch, r.recipe.lr, r.env.device, r.env.amp_dtype,
    )  # fmt: skip
