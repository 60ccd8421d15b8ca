"""`mobile-vmoe train`: one training loop for the dense ViT baseline and the Mobile V-MoE.

    mobile-vmoe train --config synthetic [--model mobile_vmoe_nano_patch8_32 --superclasses S.json] [k=v ...]
    torchrun --nproc-per-node 8 -m mobile_vmoe.cli train --config imagenet1k_tiny --data /imagenet

The loop (``train``) reads top to bottom like nanoGPT's train.py: validate everything -> lock the run directory
-> build data, model, optimizer -> maybe resume -> for each step: forward, loss, backward, step, EMA, log,
checkpoint -> per epoch: evaluate -> final weights. Set-up lives in ``train_setup``, the run directory (lock,
config, checkpoints) in ``train_run``, the counting in ``train_metrics``, the loss in ``models.losses``. Recipe
pieces are timm's own factories (create_transform, Mixup, create_optimizer_v2, create_scheduler_v2, ModelEmaV3).

Decisions:
- Number of classes: ``model_kwargs.num_classes`` if set (it must equal the number of class folders, else a
  UserError before training), otherwise taken from the data.
- Held-out split: carved from train/ (``data.heldout_fraction``, at least ``heldout_min_per_class`` per class),
  written to RUN/heldout.txt and never trained on; the super-class stage evaluates exactly these images.
- Unreadable images: a dataset with more than ``data.max_bad_fraction`` of them is refused before training; a
  few are skipped batch by batch; an epoch in which no image could be read is an error, not a silent no-op.
- MoE loss (``models.losses.Objective``): L = CE(logits, y) + router_loss_weight * CE(router logits, super-class
  of y) with a super-class map; with mixup the super-class target is the mixed soft class target mapped through
  the assignment matrix. Without a map: L = CE + balance_loss_weight * V-MoE importance loss.
- DDP + MoE: an expert that gets no image in a step has no gradient on that rank, so the MoE is wrapped with
  ``find_unused_parameters=True`` (the dense model without it). The alternative, adding 0 * sum(unused params)
  to the loss, hands AdamW zero gradients, which still moves those experts (momentum, weight decay): training
  would differ from one process.
- Checkpoints (``train_run``): every ``checkpoint.every_n_steps`` steps and at every epoch end, the last
  ``keep_last`` kept. Resuming restores weights, optimizer, scaler, EMA, the epoch's metric sums and the
  position in the epoch's data order (a function of seed and epoch); the learning rate is a function of
  (config, step). All randomness (augmentation, mixup, drop path) is re-seeded from (seed, rank, step) after
  every step, so with ``data.num_workers=0`` a resumed run ends with the weights of an uninterrupted one (with
  workers, their augmentation streams restart at the resume point). A resume may change only
  ``config.RESUME_MAY_CHANGE``.
- Final weights: RUN/model.safetensors holds the EMA weights when ``ema`` is on (that is what DeiT reports and
  deploys), else the trained weights; checkpoints always hold the trained weights (EMA in state.pt).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import UserError
from .config import Config, config_to_dict, load_config
from .evaluate import eval_counts, summarize_counts
from .models.losses import Objective
from .train_metrics import EpochSums, MetricsLog, Window, all_reduce
from .train_run import (
    CKPT_DIR,
    COMPLETE,
    check_out,
    check_run_dir,
    find_checkpoint,
    finish_run,
    locked,
    newest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    write_run_files,
)
from .train_setup import (
    Data,
    Env,
    Loaders,
    Recipe,
    RoutedForward,
    build_loaders,
    build_model,
    build_recipe,
    epoch_loader,
    init_process_group,
    make_env,
    optimizer_step,
    prepare_data,
    reseed,
    wrap_model,
)

log = logging.getLogger(__name__)

__all__ = ["train", "train_step", "Objective", "RoutedForward", "find_checkpoint", "COMPLETE", "CKPT_DIR"]


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
    optimizer_step(fwd, optimizer, loss, scaler, clip_grad, zero_batch)
    return parts


def train(cfg: Config) -> Path:
    """Train ``cfg.model`` as configured; returns the run directory (see docs/FILES.md). An image-text model
    (LIMoE, CLIP) trains contrastively on a caption set: ``train_image_text``."""
    from tqdm import tqdm

    from .models.names import image_text_models

    if cfg.model in image_text_models():
        from .train_image_text import train_image_text

        return train_image_text(cfg)
    # ---- set-up: everything that can be wrong with the input fails here, before any training ----------------
    env = make_env(cfg)  # rank, world size, device, autocast dtype; the checks that need no data
    cfg.out = cfg.out or str(Path("runs") / f"{cfg.name}-{cfg.model}")
    run = Path(cfg.out).absolute()
    check_out(run)
    data = prepare_data(cfg, env)  # built-in datasets are built; held-out split; steps per epoch
    model, meta, assignment = build_model(cfg, data, run)
    E = model.num_experts if getattr(model, "is_moe", False) else 0
    spe, total, every = data.steps_per_epoch, data.total_steps, cfg.checkpoint.every_n_steps
    with contextlib.ExitStack() as stack:
        stack.enter_context(locked(run, env.main))  # one training at a time writes RUN
        changes = check_run_dir(run, cfg, data.heldout, data.data_dir)  # reuse and resume rules
        if env.main:
            for key, (old, new) in changes.items():
                log.info("resume changes %s: %r -> %r", key, old, new)
            write_run_files(run, cfg, data.heldout)  # config.yaml, heldout.txt: only once they are valid
        init_process_group(env)  # after validation: a bad input fails every rank alike, before any rendezvous
        model.to(env.device)
        loaders = build_loaders(cfg, data, meta.preprocess, env)
        objective = Objective(data.num_classes, E, assignment, cfg.moe.router_loss_weight,
                              cfg.moe.balance_loss_weight, cfg.aug.label_smoothing,
                              cfg.moe.importance_loss_weight, cfg.moe.load_loss_weight).to(env.device)  # fmt: skip
        recipe = build_recipe(cfg, model, data, env)
        step, resumed_sums = _resume(run, model, recipe, data, env) if cfg.resume else (0, None)
        fwd = wrap_model(model, cfg, env)  # RoutedForward, DDP, torch.compile
        metrics = stack.enter_context(MetricsLog(run, env.main))
        _log_start(cfg, env, data, model, recipe)

        # ---- the loop --------------------------------------------------------------------------------------
        model.train()
        while step < total:
            epoch = step // spe
            sums = EpochSums(E, resumed_sums if env.main and step % spe else None)  # ranks' sums add up
            resumed_sums, window = None, Window()
            bar = tqdm(total=spe, initial=step % spe, desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}", leave=False,
                       disable=None if env.main else True)  # fmt: skip
            # the epoch's batches from `step` on; iter() draws a seed from the global RNG: re-seed after it
            batches = iter(epoch_loader(cfg, loaders, data.steps_per_epoch, data.batch, env, step))
            reseed(cfg.seed, env.rank, step)
            for images, targets, n_bad in batches:
                sums.skip(n_bad)
                images, targets, zero = _batch(images, targets, loaders.mixup, env, meta.preprocess.size)
                if zero and env.world == 1:
                    log.warning("step %d: every image of the batch was unreadable; step skipped", step + 1)
                else:
                    recipe.scheduler.step_update(num_updates=step)
                    parts = train_step(fwd, recipe.optimizer, images, targets, objective, loaders.mixup,
                                       env.amp_dtype, recipe.scaler, cfg.optim.clip_grad, zero)  # fmt: skip
                    if recipe.ema is not None:
                        recipe.ema.update(model, step=step)
                    if not zero:
                        sums.add(parts, len(targets))
                        window.add(parts, len(targets))
                step += 1
                reseed(cfg.seed, env.rank, step)  # step s+1's randomness depends on s only: resumable exactly
                bar.update(1)
                if step % cfg.log_interval == 0 or step == total:
                    lr = recipe.optimizer.param_groups[0]["lr"]
                    rec = window.record(step, spe, lr, env.world, sums.skipped)
                    metrics.emit(rec, log_line=bool(bar.disable))  # a plain line where no bar shows
                    bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.3f}")
                if step % spe and (step == total or (every and step % every == 0)):  # a mid-epoch checkpoint
                    so_far = sums.reduced(env.device, env.world)  # a collective: every rank takes part
                    if env.main:
                        state = _state(step, cfg, data, env, recipe, so_far)
                        save_checkpoint(run, step, model, meta, state, cfg.checkpoint.keep_last)
                if step >= total:
                    break
            bar.close()

            # ---- end of epoch (or of a max_steps run): metrics, evaluation, checkpoint -----------------------
            sums = sums.reduced(env.device, env.world)
            if sums.images == 0:
                raise UserError(
                    f"{data.data_dir}: no training image of epoch {epoch + 1} could be read ({sums.skipped} "
                    "unreadable); nothing was trained"
                )
            rec = sums.record(step, spe, with_router=assignment is not None)
            rec.update(_evaluate(model, recipe, loaders, objective, data, env))
            metrics.emit(rec)
            if env.main and step % spe == 0:  # a new epoch starts with no sums
                state = _state(step, cfg, data, env, recipe, None)
                save_checkpoint(run, step, model, meta, state, cfg.checkpoint.keep_last)

        # ---- final weights -----------------------------------------------------------------------------------
        finish_run(run, model, recipe.ema.module if recipe.ema is not None else None, meta, env.rank, env.world,
                   step, cfg.dump_replicas)  # fmt: skip
    return run


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------------------------


def _batch(
    images: torch.Tensor, targets: torch.Tensor, mixup: Any, env: Env, size: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The batch on the device, and whether it is empty (every image unreadable): then a dummy batch, which DDP
    peers need for the gradient all-reduce (trained with weight zero)."""
    if mixup is not None and len(targets) % 2:  # mixup pairs images: it needs an even batch
        images, targets = images[:-1], targets[:-1]
    zero = len(targets) == 0
    if zero:
        images, targets = torch.zeros(2, 3, size, size), torch.zeros(2, dtype=torch.long)
    return images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True), zero


def _state(
    step: int, cfg: Config, data: Data, env: Env, recipe: Recipe, sums: EpochSums | None
) -> dict[str, Any]:
    """state.pt of a checkpoint: tensors and plain Python values only (it loads with weights_only=True)."""
    return {
        "step": step,
        "epoch": step // data.steps_per_epoch,
        "steps_per_epoch": data.steps_per_epoch,
        "total_steps": data.total_steps,
        "world_size": env.world,
        "optimizer": recipe.optimizer.state_dict(),
        "scaler": recipe.scaler.state_dict() if recipe.scaler is not None else None,
        "ema": recipe.ema.module.state_dict() if recipe.ema is not None else None,
        "epoch_sums": sums.state() if sums is not None else None,  # all ranks' sums of the epoch so far
        "config": config_to_dict(cfg),
    }


def _resume(run: Path, model: nn.Module, recipe: Recipe, data: Data, env: Env) -> tuple[int, Any]:
    """Restore the newest checkpoint whose files read: (its step, the epoch's sums so far or None)."""
    ck = newest_checkpoint(run, move_damaged=env.main)  # only the main rank holds the lock
    if ck is None:
        log.warning("--resume: no complete checkpoint in %s, starting from step 0", run / CKPT_DIR)
        return 0, None
    restore_checkpoint(ck, model, recipe, data.steps_per_epoch)
    step = ck.state["step"]
    if env.main:
        log.info("resuming from %s (step %d of %d)", ck.dir, step, data.total_steps)
    return step, ck.state.get("epoch_sums")


def _evaluate(
    model: nn.Module, recipe: Recipe, loaders: Loaders, objective: Objective, data: Data, env: Env
) -> dict[str, Any]:
    """Validation metrics of the model (and its EMA) over all ranks' shares of val/; {} without val images."""
    if loaders.val is None:
        return {}
    super_of = objective.super_of

    def counts(m: nn.Module) -> dict[str, Any]:
        c = eval_counts(m, loaders.val, data.num_classes, super_of, env.device, env.amp_dtype)
        return summarize_counts(
            all_reduce(c, env.device, env.world), with_router_accuracy=super_of is not None
        )

    v = counts(model)
    rec = {"val_top1": v["top1"], "val_top5": v["top5"], "val_loss": v["loss"], "val_skipped": v["skipped"]}
    if "expert_load" in v:
        rec["val_expert_load"] = v["expert_load"]
        if v.get("router_accuracy") is not None:
            rec["val_router_acc"] = v["router_accuracy"]
    if recipe.ema is not None:
        ve = counts(recipe.ema.module)
        rec.update(ema_val_top1=ve["top1"], ema_val_top5=ve["top5"])
    return rec


def _log_start(cfg: Config, env: Env, data: Data, model: nn.Module, recipe: Recipe) -> None:
    if not env.main:
        return
    n_params = sum(p.numel() for p in model.parameters())
    kind = f"MoE E={model.num_experts} K={model.top_k}" if getattr(model, "is_moe", False) else "dense"
    log.info(
        "%s (%s, %.2fM params) on %d classes, %d train / %d held-out / %d val images; %d steps/epoch x %d "
        "epochs, %d steps; world %d, batch %d/rank, lr %.2e, device %s, amp %s",
        cfg.model, kind, n_params / 1e6, data.num_classes, len(data.train_samples), len(data.heldout),
        len(data.index.val), data.steps_per_epoch, cfg.schedule.epochs, data.total_steps, env.world, data.batch,
        recipe.lr, env.device, env.amp_dtype,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = load_config(args.config, args.overrides)
    if args.data and args.dataset:
        raise UserError("pass either --data DIR or --dataset NAME, not both")
    if args.data or args.dataset:
        cfg.data.spec = args.data or args.dataset
    for flag, value in (("model", args.model), ("out", args.out), ("init_from", args.init_from)):
        if value:
            setattr(cfg, flag, value)
    if args.superclasses:
        cfg.moe.superclasses = args.superclasses
    if args.epochs is not None:
        cfg.schedule.epochs = args.epochs
    cfg.resume = cfg.resume or args.resume
    run = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(run)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from .config import list_presets

    p = sub.add_parser(
        "train",
        help="train a dense ViT or a Mobile V-MoE, or an image-text model (LIMoE, CLIP) on captions (DDP with "
        "torchrun)",
        description="Train with a preset or YAML config plus key=value overrides (e.g. optim.lr=1e-3).",
    )
    p.add_argument("--config", required=True, help=f"preset ({', '.join(list_presets())}) or YAML file")
    p.add_argument("--model", default=None, help="timm model name, e.g. mobile_vmoe_tiny_patch16_224")
    p.add_argument("--data", default=None, help="ImageFolder dataset directory")
    p.add_argument("--dataset", choices=("synthetic", "digits", "synthetic-captions"), default=None,
                   help="built-in dataset (synthetic-captions: for the image-text models)")  # fmt: skip
    p.add_argument("--superclasses", default=None, help="superclasses.json: super-class router loss (MoE)")
    p.add_argument("--init-from", default=None, metavar="FILE", help="model file whose weights start the run")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.set_defaults(func=_cli)
