"""Verification of an exported artifact: real images through the model's ``Preprocess``, and parity with eager.

Images: the checkpoint's held-out list (images training never saw), topped up from the dataset's val/ split and
then from training images nobody calibrates on; or ``--data``; or the built-in synthetic set. The same records
give int8-static its calibration images (training images) and dynamic int8 its layer-choice images (held out
like the verification ones, but disjoint from them). Every image goes through ``meta.preprocess.transform()``:
what the model was evaluated with, and what the sidecar tells apps to do.

Parity: the artifact runs here (ExecuTorch runtime, ONNX Runtime) and its logits are compared with eager
PyTorch's: max abs difference and top-1 agreement against the thresholds of ``Thresholds``. Core ML, which
cannot predict on Linux, is checked structurally instead (``coreml.check_structure``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mobile_vmoe.checkpoint import ModelMeta
from mobile_vmoe.common import UserError
from mobile_vmoe.files.file_list import Sample, read_file_list

from .onnx_export import OnnxRunner
from .pte import PteRunner
from .quiet import Progress

__all__ = ["Images", "Thresholds", "VerificationError", "load_images", "parity", "verify_onnx", "verify_pte"]

FP32_ATOL = 1e-4
INT8_MIN_AGREEMENT = 0.99


class VerificationError(RuntimeError):
    """The exported artifact does not match eager PyTorch (or, for Core ML, lost the sparse structure)."""


@dataclass
class Images:
    """Normalised images [N, 3, H, W] for the export, and where they came from (for the sidecar)."""

    verify: torch.Tensor
    calibrate: list[torch.Tensor]  # [1, 3, H, W] each; empty unless int8-static needs them
    tune: torch.Tensor  # int8's choice of fp32 layers; empty unless it needs them
    source: dict[str, Any] = field(default_factory=dict)


class Thresholds(NamedTuple):
    """What parity must reach; None: not enforced."""

    atol: float | None
    min_agreement: float | None

    @classmethod
    def choose(
        cls,
        fmt: str,
        quantized: bool,
        random_weights: bool,
        atol: float | None,
        min_agreement: float | None,
    ) -> Thresholds:
        """fp32: max abs diff <= 1e-4 and 100 % top-1 agreement; int8: >= 99 % agreement, enforced by default only
        for trained weights (random-weight logits are nearly tied, so int8 flips them). Given values override
        and are then always enforced. Core ML: nothing (checked structurally)."""
        if fmt == "coreml":
            return cls(None, None)
        if quantized:
            if min_agreement is None and not random_weights:
                min_agreement = INT8_MIN_AGREEMENT
            return cls(atol, min_agreement)
        return cls(FP32_ATOL if atol is None else atol, 1.0 if min_agreement is None else min_agreement)


# ---------------------------------------------------------------------------------------------------------------
# Real images
# ---------------------------------------------------------------------------------------------------------------


def _spread(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """A deterministic random subset of n samples (all classes, not just the first folders)."""
    if len(samples) <= n:
        return list(samples)
    idx = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[i] for i in sorted(idx)]


def _load_tensors(data_dir: Path, samples: list[Sample], transform: Any) -> torch.Tensor:
    from mobile_vmoe.data import ImageListDataset, collate_skip_bad

    if not samples:
        return torch.empty(0)
    ds = ImageListDataset(data_dir, samples, transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False, collate_fn=collate_skip_bad)
    return torch.cat([x for x, _, _ in loader if x.numel()])


def _dataset(
    meta: ModelMeta, data: str | os.PathLike[str] | None, data_root: str | os.PathLike[str]
) -> tuple[Path, list[Sample], dict[str, Any]]:
    """(dataset directory, its held-out samples, source record): ``data``, else the model's training data."""
    from mobile_vmoe.data import prepare_dataset

    if data is not None:
        data_dir = prepare_dataset(str(data), root=data_root)
        return data_dir, [], {"data_dir": str(data_dir)}
    if meta.train.data_dir:
        data_dir = Path(meta.train.data_dir)
        if not data_dir.is_dir():
            raise UserError(
                f"checkpoint metadata names data_dir {data_dir}, which does not exist here; pass --data DIR"
            )
        if not meta.train.heldout_list:
            return data_dir, [], {"data_dir": str(data_dir)}
        heldout = read_file_list(meta.train.heldout_list, data_dir)
        return data_dir, heldout, {"data_dir": str(data_dir), "heldout_list": meta.train.heldout_list}
    # Default sizes on purpose: prepare_dataset rebuilds a directory whose parameters differ, so any other
    # choice could replace the dataset a training run uses.
    data_dir = prepare_dataset("synthetic", root=data_root)
    return data_dir, [], {"data_dir": str(data_dir), "builtin": "synthetic"}


def _top_up(chosen: list[Sample], n: int, pools: list[tuple[list[Sample], int]]) -> list[Sample]:
    """``chosen`` topped up to n from each (pool, seed) in turn, never repeating a sample."""
    for pool, seed in pools:
        if len(chosen) >= n:
            break
        taken = set(chosen)
        chosen = chosen + _spread([s for s in pool if s not in taken], n - len(chosen), seed=seed)
    return chosen


def load_images(
    meta: ModelMeta,
    data: str | os.PathLike[str] | None,
    data_root: str | os.PathLike[str],
    num_verify: int,
    num_calibrate: int = 0,
    num_tune: int = 0,
) -> Images:
    """Verification images (held out, then val, then training images nobody calibrates on); ``num_calibrate``
    int8-static calibration images (training images); ``num_tune`` images for int8's layer choice, like the
    verification ones but not the same (training images are fitted, so int8 flips far fewer of them: the demo
    dense model agreed on 99.6 % of them against 99.0 % of held-out ones)."""
    from mobile_vmoe.data import scan_dataset

    data_dir, heldout, source = _dataset(meta, data, data_root)
    index = scan_dataset(data_dir)
    held = set(heldout)
    calib_pool = [s for s in index.train if s not in held]
    calibrate = _spread(calib_pool, num_calibrate, seed=1) if num_calibrate else []
    calibrated = set(calibrate)
    uncalibrated = [s for s in calib_pool if s not in calibrated]
    verify = _top_up(_spread(heldout, num_verify), num_verify, [(index.val, 0), (uncalibrated, 2)])
    source["num_heldout"] = min(len(heldout), num_verify)
    tune: list[Sample] = []
    if num_tune:
        others = set(verify)
        pools = [[s for s in pool if s not in others] for pool in (heldout, index.val, uncalibrated)]
        tune = _top_up(_spread(pools[0], num_tune, seed=3), num_tune, [(pools[1], 3), (pools[2], 4)])
    tf = meta.preprocess.transform()
    xv = _load_tensors(data_dir, verify, tf)
    if xv.shape[0] == 0:
        raise UserError(f"{data_dir}: no readable images to verify the export on")
    xc = _load_tensors(data_dir, calibrate, tf)
    return Images(
        verify=xv,
        calibrate=[xc[i : i + 1] for i in range(xc.shape[0])],
        tune=_load_tensors(data_dir, tune, tf),
        source=source,
    )


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------


# (eager outputs, artifact outputs, thresholds) -> (figures, failures); image_text.text_parity for text encoders
Compare = Callable[[torch.Tensor, torch.Tensor, "Thresholds"], tuple[dict[str, Any], list[str]]]


def parity(ref: torch.Tensor, out: torch.Tensor, thr: Thresholds) -> tuple[dict[str, Any], list[str]]:
    """(figures, failures) of logits ``out`` against eager ``ref`` ([N, C] each)."""
    diff = float((out.float() - ref.float()).abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    figures = {
        "n_images": int(ref.shape[0]),
        "max_abs_diff": diff,
        "top1_agreement": agree,
        "atol": thr.atol,
        "min_top1_agreement": thr.min_agreement,
    }
    failures = []
    if thr.atol is not None and not diff <= thr.atol:
        failures.append(f"max abs difference {diff:.3g} > {thr.atol:.3g}")
    if thr.min_agreement is not None and agree < thr.min_agreement:
        failures.append(f"top-1 agreement {agree:.2%} < {thr.min_agreement:.2%}")
    return figures, failures


def verify_pte(
    path: Path, images: torch.Tensor, ref: torch.Tensor, thr: Thresholds, compare: Compare = parity
) -> tuple[dict[str, Any], list[str]]:
    """The .pte in the ExecuTorch runtime, one image per run (its batch is static 1), against eager."""
    with Progress(f"verifying on {images.shape[0]} images", total=images.shape[0], unit="image") as p:
        got = PteRunner(path)(images, progress=p)
    figures, failures = compare(ref, got, thr)
    figures["runtime"] = "executorch.runtime (XNNPACK)"
    return figures, failures


def verify_onnx(
    path: Path, images: torch.Tensor, ref: torch.Tensor, thr: Thresholds, compare: Compare = parity
) -> tuple[dict[str, Any], list[str]]:
    """The .onnx in ONNX Runtime: one image per run, as an app runs it (a MoE takes its expert switch), then
    all images as one batch (mixed routing: a MoE's gather form); both must match eager."""
    runner = OnnxRunner(path)
    with Progress(f"verifying on {images.shape[0]} images", total=images.shape[0], unit="image") as p:
        outs = []
        for x in images:
            outs.append(runner(x[None]))
            p.advance()
    figures, failures = compare(ref, torch.cat(outs), thr)
    batched, batch_failures = compare(ref, runner(images), thr)
    figures["batched"] = {k: batched[k] for k in ("max_abs_diff", "top1_agreement")}
    figures["runtime"] = "onnxruntime CPUExecutionProvider"
    return figures, failures + [f"in one batch: {f}" for f in batch_failures]
