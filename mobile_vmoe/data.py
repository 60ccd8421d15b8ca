"""Datasets on disk: ImageFolder scanning, the held-out split, and the ``mobile-vmoe dataset`` verb.

On-disk layout (docs/FILES.md): ``DIR/train/<class>/<image>``, ``DIR/val/<class>/<image>``; class index =
position of the class folder name in sorted order. Built-in datasets (``builtin_data``: synthetic, digits) also
write ``DIR/dataset.json``, a ``DIR/COMPLETE`` marker (written last) and, for the synthetic set,
``DIR/superclasses_true.json``. Reading the images is ``images``; both are re-exported here, the one module
stages import their data from. The verb also builds and checks caption sets (``captions``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from .builtin_data import (
    BUILTIN,
    COMPLETE_MARKER,
    DATASET_JSON,
    SUPERCLASSES_TRUE_JSON,
    make_digits,
    make_synthetic,
    prepare_dataset,
)
from .captions import check_caption_source, is_caption_source
from .common import UserError
from .files.file_list import Sample
from .files.superclass_map import SuperclassMap, read_superclass_map
from .images import (
    ImageListDataset,
    check_images,
    check_max_bad_fraction,
    collate_skip_bad,
    describe_unreadable,
    first_few,
    inspect_images,
    require_readable,
)

__all__ = [
    "BUILTIN",
    "COMPLETE_MARKER",
    "DATASET_JSON",
    "SUPERCLASSES_TRUE_JSON",
    "DatasetIndex",
    "ImageListDataset",
    "Sample",
    "check_images",
    "collate_skip_bad",
    "heldout_split",
    "load_superclass_truth",
    "make_digits",
    "make_synthetic",
    "prepare_dataset",
    "scan_dataset",
]


@dataclass
class DatasetIndex:
    data_dir: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]


# ---------------------------------------------------------------------------------------------------------------
# Scanning, splits, file lists
# ---------------------------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(class_dir: Path, data_dir: Path) -> list[str]:
    """Image paths under class_dir (recursive, as torchvision's ImageFolder), relative to data_dir, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if _is_image(fn):
                found.append((Path(dirpath) / fn).relative_to(data_dir).as_posix())
    return found


def scan_dataset(data_dir: str | os.PathLike[str], num_classes: int | None = None) -> DatasetIndex:
    """Index an ImageFolder dataset: ``data_dir/train/<class>/*`` and optional ``data_dir/val/<class>/*``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"dataset directory not found: {data_dir}")
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"{data_dir}: no train/ folder (expected ImageFolder layout DIR/train/<class>/<image>)"
        )
    class_names = _class_dirs(train_dir)
    if not class_names:
        raise UserError(f"{train_dir}: no class folders (expected {train_dir}/<class>/<image>)")
    if num_classes is not None and len(class_names) != num_classes:
        raise UserError(
            f"{train_dir}: found {len(class_names)} class folders, expected num_classes={num_classes}"
        )
    index = {c: i for i, c in enumerate(class_names)}
    ext = ", ".join(IMG_EXTENSIONS)

    def split(split_dir: Path, names: list[str]) -> list[Sample]:
        out = []
        for c in names:
            files = _images_in(split_dir / c, data_dir)
            if not files:
                raise UserError(f"{split_dir / c}: class folder holds no images (extensions: {ext})")
            out.extend(Sample(p, index[c]) for p in files)
        return out

    train = split(train_dir, class_names)
    val: list[Sample] = []
    val_dir = data_dir / "val"
    if val_dir.is_dir():
        val_names = _class_dirs(val_dir)
        missing = [c for c in val_names if c not in index]
        if missing:
            raise UserError(f"{val_dir}: class folder(s) {missing[:5]} not present in {train_dir}")
        val = split(val_dir, val_names)
    return DatasetIndex(data_dir=data_dir, class_names=class_names, train=train, val=val)


def heldout_split(
    samples: Sequence[Sample], fraction: float = 0.01, min_per_class: int = 2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Carve a held-out set from the training samples, per class: ``max(min_per_class, round(fraction * n))``
    images, but always leaving at least one for training. Returns ``(train_rest, heldout)``, both in input order.

    The choice depends only on (seed, class, the set of paths), not on the input order. The default 1% follows
    google-research/vmoe, which holds out train[99%:] of ImageNet.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"held-out fraction must be in [0, 1), got {fraction!r}")
    if min_per_class < 0:
        raise UserError(f"held-out min_per_class must be >= 0, got {min_per_class!r}")
    by_class: dict[int, list[str]] = {}
    for s in samples:
        by_class.setdefault(s.target, []).append(s.path)
    chosen: set[tuple[str, int]] = set()
    for target, paths in by_class.items():
        paths = sorted(paths)
        n = len(paths)
        k = min(max(min_per_class, int(round(fraction * n))), n - 1)
        if k <= 0:
            continue
        pick = np.random.default_rng([seed, target]).permutation(n)[:k]
        chosen.update((paths[i], target) for i in pick)
    rest = [s for s in samples if (s.path, s.target) not in chosen]
    held = [s for s in samples if (s.path, s.target) in chosen]
    return rest, held


def load_superclass_truth(data_dir: str | os.PathLike[str]) -> SuperclassMap | None:
    """``DIR/superclasses_true.json`` (the known super-class of each class) if the dataset has one, else None."""
    p = Path(data_dir) / SUPERCLASSES_TRUE_JSON
    return read_superclass_map(p, what="true super-classes") if p.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# CLI: `mobile-vmoe dataset synthetic|digits|DIR`
# ---------------------------------------------------------------------------------------------------------------

_SYNTHETIC_ONLY = ("num_superclasses", "num_fine", "train_per_class", "val_per_class")


def _builtin_options(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {k: getattr(args, k) for k in ("image_size", *_SYNTHETIC_ONLY) if getattr(args, k) is not None}
    if args.captions_per_image is not None:
        if args.spec != "synthetic-captions":
            raise UserError("--captions-per-image applies to the synthetic-captions set only")
        kwargs["captions_per_image"] = args.captions_per_image
    if args.spec not in ("synthetic", "synthetic-captions") and set(kwargs) & set(_SYNTHETIC_ONLY):
        flags = "/".join("--" + k.replace("_", "-") for k in _SYNTHETIC_ONLY)
        raise UserError(f"{flags} apply to the synthetic datasets only")
    return kwargs


def _check_folder(d: Path, samples: list[Sample], max_bad_fraction: float) -> None:
    """Open every image; fail naming the unreadable ones when too many are, report what loading converts."""
    found = inspect_images(d, samples)
    bad = require_readable(d, found, max_bad_fraction)
    print(f"checked {found.total} images: {found.total - len(bad)} readable")
    if bad:
        print(f"{describe_unreadable(d, found)}; training skips them")
    if found.high_bit_depth:
        print(
            f"{len(found.high_bit_depth)} images have more than 8 bits per channel; loading scales them to 8 "
            f"bits: {first_few([s.path for s in found.high_bit_depth])}"
        )


def _cli(args: argparse.Namespace) -> int:
    check_max_bad_fraction(args.max_bad_fraction)
    if is_caption_source(args.spec):  # image-caption pairs (LIMoE), not an image folder
        return check_caption_source(args, _builtin_options(args))
    d = prepare_dataset(args.spec, args.root, args.seed, **_builtin_options(args))
    idx = scan_dataset(d)
    print(f"{d}: {len(idx.class_names)} classes, {len(idx.train)} train, {len(idx.val)} val images")
    if args.spec not in BUILTIN:  # built-in images are ours; a user's folder is opened image by image
        _check_folder(d, idx.train + idx.val, args.max_bad_fraction)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dataset",
        help="build a built-in dataset (synthetic | digits | mnist | synthetic-captions), or check a dataset "
        "folder or a caption set",
    )
    p.add_argument(
        "spec",
        help="synthetic | digits | mnist | synthetic-captions | path to an ImageFolder dataset "
        "(DIR/train/<class>/...) | a caption set: FILE.csv, FILE.tsv, SHARD.tar, or a folder of them",
    )
    p.add_argument("--root", default="data", help="where built-in datasets are built (default: data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-superclasses", type=int, default=None, help="synthetic: S (default 10)")
    p.add_argument(
        "--num-fine",
        type=int,
        default=None,
        help="synthetic: F fine classes per super-class (10; synthetic-captions: 3)",
    )
    p.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="synthetic: train images per class (260; synthetic-captions: 100)",
    )
    p.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="synthetic: val images per class (50; synthetic-captions: 20)",
    )
    p.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="synthetic-captions: captions per train image (2)",
    )
    p.add_argument("--csv-img-key", default="filepath", help="caption table: image path column (filepath)")
    p.add_argument("--csv-caption-key", default="title", help="caption table: caption column (title)")
    p.add_argument("--csv-label-key", default="label", help="caption table: optional class index column")
    p.add_argument(
        "--csv-separator", default=None, help="caption table: column separator (default: by extension)"
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="DIR / caption set: fail when more than this fraction of the images (rows) cannot be read (default "
        "0.01)",
    )
    p.set_defaults(func=_cli)
