"""What the training loop counts (``mobile_vmoe.train``) and where it goes: RUN/metrics.jsonl and RUN/tb/.

Records (docs/FILES.md): ``{"kind": "train", ...}`` every ``log_interval`` steps (means over the steps since
the last one) and ``{"kind": "epoch", ...}`` per epoch (sums over the whole epoch, all ranks, resumed or not).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["EpochSums", "Window", "MetricsLog", "all_reduce"]


def all_reduce(d: dict[str, torch.Tensor], device: torch.device, world: int) -> dict[str, torch.Tensor]:
    """Sum each tensor over the ranks (on ``device``: NCCL reduces only CUDA tensors); results on the CPU."""
    if world == 1:
        return d
    out = {}
    for k, v in d.items():
        t = v.to(device).clone()
        dist.all_reduce(t)
        out[k] = t.cpu()
    return out


class EpochSums:
    """Per-rank sums over an epoch (E: experts, 0 for a dense model). A checkpoint saved mid-epoch holds the
    sums of all ranks so far, so the epoch's record after a resume still covers the whole epoch."""

    def __init__(self, num_experts: int, state: dict[str, torch.Tensor] | None = None) -> None:
        self.t: dict[str, torch.Tensor] = {
            "loss": torch.zeros((), dtype=torch.float64),
            "steps": torch.zeros((), dtype=torch.int64),
            "images": torch.zeros((), dtype=torch.int64),
            "skipped": torch.zeros((), dtype=torch.int64),
            "router_correct": torch.zeros((), dtype=torch.int64),
        }
        if num_experts:
            self.t["expert_load"] = torch.zeros(num_experts, dtype=torch.int64)
        for k, v in (state or {}).items():
            if k in self.t and v.shape == self.t[k].shape:
                self.t[k] = v.to(self.t[k].dtype).clone()
            elif k in self._PER_BLOCK:  # per-token models: [L, E] loads, [L] drops
                self.t[k] = v.clone()

    # Per-block sums of a per-token model, shaped by the first step (L MoE blocks).
    _PER_BLOCK = ("expert_load", "dropped")

    def add(self, parts: dict[str, torch.Tensor], n_images: int) -> None:
        self.t["steps"] += 1
        self.t["images"] += n_images
        self.t["loss"] += parts["loss"].double().cpu()
        if "router_correct" in parts:
            self.t["router_correct"] += parts["router_correct"].cpu()
        for k in self._PER_BLOCK:
            if k in parts:
                v = parts[k].cpu()
                if k not in self.t or self.t[k].shape != v.shape:
                    self.t[k] = torch.zeros_like(v)
                self.t[k] += v

    def skip(self, n_bad: int) -> None:
        self.t["skipped"] += n_bad

    @property
    def images(self) -> int:
        return int(self.t["images"])

    @property
    def skipped(self) -> int:
        return int(self.t["skipped"])

    def reduced(self, device: torch.device, world: int) -> EpochSums:
        """The sums of all ranks (a collective: every rank calls it at the same step)."""
        out = EpochSums(0)
        out.t = all_reduce(self.t, device, world)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.t.items()}

    def record(self, step: int, steps_per_epoch: int, with_router: bool) -> dict[str, Any]:
        """The epoch record's training part (call on reduced sums)."""
        t = self.t
        rec: dict[str, Any] = {"kind": "epoch", "step": step, "epoch": step / steps_per_epoch}
        rec["train_loss"] = float(t["loss"]) / max(int(t["steps"]), 1)
        rec["train_skipped"] = int(t["skipped"])
        if "dropped" in t:  # per-token: mean fraction of choices dropped, per MoE block
            rec["train_dropped"] = (t["dropped"] / max(int(t["steps"]), 1)).tolist()
        if "expert_load" in t:
            rec["train_expert_load"] = t["expert_load"].tolist()
            if with_router:
                rec["train_router_acc"] = float(t["router_correct"]) / max(int(t["images"]), 1)
        return rec


class Window:
    """Means of the scalar loss parts over the steps since the last train record, and the image rate."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, parts: dict[str, torch.Tensor], n_images: int) -> None:
        for k, v in parts.items():
            if v.ndim == 0 and k != "router_correct":  # scalars; per-block tensors go to the epoch record
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        if "router_correct" in parts:
            self.sums["router_acc"] = (
                self.sums.get("router_acc", 0.0) + float(parts["router_correct"]) / n_images
            )
        self.steps += 1
        self.images += n_images

    def record(self, step: int, steps_per_epoch: int, lr: float, world: int, skipped: int) -> dict[str, Any]:
        """The train record (``skipped``: unreadable images so far this epoch), then a fresh window."""
        dt = time.perf_counter() - self.t0
        rec: dict[str, Any] = {"kind": "train", "step": step, "epoch": step / steps_per_epoch}
        rec.update({k: v / max(self.steps, 1) for k, v in self.sums.items()})
        rec.update(lr=lr, images_per_s=self.images * world / max(dt, 1e-9), skipped=skipped)
        self._reset()
        return rec


def _fmt(rec: dict[str, Any]) -> str:
    items = [(k, v) for k, v in rec.items() if k not in ("kind", "step", "epoch")]
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)


class MetricsLog:
    """RUN/metrics.jsonl (appended: a resumed run may repeat records, the last per step wins) and TensorBoard
    scalars; a no-op on ranks other than the main one."""

    def __init__(self, run: Path, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tb"))
            self.file = open(run / "metrics.jsonl", "a")

    def emit(self, rec: dict[str, Any], log_line: bool = False) -> None:
        """Append ``rec``; ``log_line``: also a plain log line (train records when no progress bar shows)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                self.writer.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])
        if log_line or rec["kind"] == "epoch":
            log.info("%s %.2f step %d: %s", rec["kind"], rec["epoch"], rec["step"], _fmt(rec))

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.file.close()
            self.enabled = False

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
