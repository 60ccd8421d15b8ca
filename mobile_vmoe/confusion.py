"""The dense model's confusion matrix on its held-out split: the input of super-class discovery.

    conf = heldout_confusion("RUN/model.safetensors")   # runs the model on RUN/heldout.txt
    write_confusion("OUT/confusion", conf)              # confusion.npy, confusion.csv, classes.json
    conf = read_confusion("OUT/confusion")

Shape letters: C classes (mobile_vmoe/models/moe.py). Rows are true classes, columns predicted ones. A class
with no readable held-out image has an all-zero row (``Confusion.empty_classes``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .common import (
    UserError,
    atomic_path,
    load_path,
    move_root,
    read_json,
    store_path,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from .checkpoint import ModelMeta

log = logging.getLogger(__name__)

__all__ = [
    "Confusion",
    "check_counts",
    "heldout_confusion",
    "load_counts",
    "read_confusion",
    "write_confusion",
]

CONFUSION_NPY = "confusion.npy"
CONFUSION_CSV = "confusion.csv"
CLASSES_JSON = "classes.json"


@dataclass
class Confusion:
    counts: np.ndarray  # [C, C] int64: held-out images of class i (row) predicted as class j (column)
    class_names: list[str]  # [C]
    data_dir: Path | None = None  # the dataset the held-out images came from

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.counts) / max(self.num_images, 1))

    @property
    def empty_classes(self) -> list[str]:
        """Classes without a single held-out image (too few images to hold any out, or all unreadable)."""
        return [self.class_names[i] for i in np.flatnonzero(self.counts.sum(axis=1) == 0)]


def check_counts(C: Any, what: str = "confusion matrix") -> np.ndarray:
    """A finite, non-negative, numeric square matrix as float64, else UserError naming ``what``."""
    C = np.asarray(C)
    if C.dtype.kind not in "iuf":
        raise UserError(f"{what}: expected a numeric (integer or float) matrix, got dtype {C.dtype}")
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
        raise UserError(f"{what}: expected a square N x N matrix (rows = true class), got shape {C.shape}")
    C = C.astype(np.float64)
    if not np.isfinite(C).all():
        raise UserError(f"{what}: holds NaN or infinite values")
    if (C < 0).any():
        raise UserError(f"{what}: holds negative counts (e.g. {C.min():g}); expected counts >= 0")
    return C


def _check_heldout(ckpt_file: Path, meta: ModelMeta, num_outputs: int, data_dir: Path | None) -> Path:
    """Where the held-out images are; every problem found before the model runs."""
    source = "--data"
    if data_dir is None:
        if not meta.train.data_dir:
            raise UserError(f"{ckpt_file}: metadata train.data_dir is missing; pass --data DIR")
        data_dir, source = Path(meta.train.data_dir), f"{ckpt_file}: metadata train.data_dir; pass --data DIR"
    if not data_dir.is_dir():
        raise UserError(f"dataset directory not found: {data_dir} (from {source})")
    if not meta.train.heldout_list or not Path(meta.train.heldout_list).is_file():
        raise UserError(
            f"{ckpt_file}: held-out list not found ({meta.train.heldout_list}); the super-class stage needs "
            f"the held-out split written by training"
        )
    if len(meta.class_names) not in (0, num_outputs):
        raise UserError(
            f"{ckpt_file}: {len(meta.class_names)} class_names but the model has {num_outputs} outputs"
        )
    return data_dir


def heldout_confusion(
    checkpoint: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> Confusion:
    """Run the dense model (file or run directory) on its held-out split; ``data_dir`` overrides its dataset."""
    import torch

    from .checkpoint import load_model, resolve_model_file
    from .cli import progress
    from .data import ImageListDataset, collate_skip_bad
    from .files.file_list import read_file_list

    ckpt_file = resolve_model_file(checkpoint)
    model, meta = load_model(ckpt_file, expect_moe=False)
    n = model.num_classes
    data = _check_heldout(ckpt_file, meta, n, Path(data_dir) if data_dir is not None else None)
    samples = read_file_list(meta.train.heldout_list, data)
    if not samples:
        raise UserError(f"{ckpt_file}: the held-out list {meta.train.heldout_list} is empty")
    bad = next((s for s in samples if s.target >= n), None)
    if bad is not None:
        raise UserError(f"held-out list: class index {bad.target} ({bad.path}) >= number of classes {n}")

    loader = torch.utils.data.DataLoader(
        ImageListDataset(data, samples, meta.preprocess.transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
    )
    counts = np.zeros((n, n), dtype=np.int64)
    skipped = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(device)
    with torch.inference_mode():
        for images, targets, n_bad in progress(loader, len(loader), "held-out confusion"):
            skipped += n_bad
            if len(targets):
                pred = model(images.to(device)).argmax(dim=1).cpu().numpy()
                np.add.at(counts, (targets.numpy(), pred), 1)
    if skipped:
        log.warning("skipped %d unreadable held-out image(s)", skipped)
    if not counts.any():
        raise UserError(f"none of the {len(samples)} held-out images could be read under {data}")
    conf = Confusion(counts, list(meta.class_names) or [f"class_{i}" for i in range(n)], data)
    log.info("held-out accuracy %.4f on %d images", conf.accuracy, conf.num_images)
    return conf


def write_confusion(out_dir: str | os.PathLike[str], conf: Confusion) -> list[Path]:
    """confusion.npy (counts), confusion.csv (for people) and classes.json into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    npy, csv_path, classes = out_dir / CONFUSION_NPY, out_dir / CONFUSION_CSV, out_dir / CLASSES_JSON
    with atomic_path(npy, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, conf.counts, allow_pickle=False)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true \\ predicted", *conf.class_names])
    for name, row in zip(conf.class_names, conf.counts):
        w.writerow([name, *(int(v) if float(v).is_integer() else float(v) for v in row)])
    write_text_atomic(csv_path, buf.getvalue())
    # relative when the dataset moves with out_dir (a pipeline's generated data): common.store_path
    data_dir = store_path(conf.data_dir, out_dir, move_root(out_dir)) if conf.data_dir is not None else None
    write_json_atomic(classes, {"class_names": conf.class_names, "data_dir": data_dir})
    return [npy, csv_path, classes]


def load_counts(path: str | os.PathLike[str], what: str) -> np.ndarray:
    """An N x N numeric matrix from a .npy file (no pickles), as float64 if it is valid, else UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: file not found: {p}")
    try:
        C = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{what} {p}: not a readable numeric .npy file ({e})") from None
    if not isinstance(C, np.ndarray):  # an .npz archive
        raise UserError(f"{what} {p}: expected a single .npy array, got an archive")
    return check_counts(C, f"{what} {p}")


def read_confusion(out_dir: str | os.PathLike[str]) -> Confusion:
    """What ``write_confusion`` wrote to ``out_dir``."""
    out_dir = Path(out_dir)
    counts = load_counts(out_dir / CONFUSION_NPY, "confusion matrix")
    obj = read_json(out_dir / CLASSES_JSON, "class list of the confusion matrix")
    names = obj.get("class_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != counts.shape[0]:
        raise UserError(
            f"{out_dir / CLASSES_JSON}: 'class_names' must list the {counts.shape[0]} classes of "
            f"{out_dir / CONFUSION_NPY}; got {json.dumps(names)[:80]}"
        )
    data_dir = obj.get("data_dir")
    data = load_path(data_dir, out_dir) if isinstance(data_dir, str) and data_dir else None
    return Confusion(counts.astype(np.int64), [str(c) for c in names], data)
