"""Image-caption data for contrastive training (LIMoE, CLIP): caption sets, and the datasets built on them.

``read_caption_set(source)`` reads (formats: ``files.captions``, docs/FILES.md)

    FILE.csv | FILE.tsv    a caption table (open_clip's layout: ``filepath``, ``title``)
    SHARD.tar              one WebDataset shard
    DIR                    DIR/captions.csv or DIR/captions.tsv, else the shards DIR/*.tar

and the class names for zero-shot prompts from a ``classes.json`` in the source's folder or the one above it
(the built-in set, ``builtin_captions``, keeps one beside its ``train/`` and ``val/`` splits). Bad rows are
skipped and counted per reason (``CaptionSet.skipped``); every image is decoded first, so an unreadable one is
counted here rather than met in training; a source with nothing usable, or more bad rows than
``max_bad_fraction``, is a UserError.

``ImageTextDataset`` gives (image [3, H, W], tokens [L]) per caption; ``LabelledImages`` gives (image, class)
per image, for zero-shot evaluation through ``images.collate_skip_bad``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from .builtin_captions import BUILTIN_CAPTIONS, SPLITS, prepare_caption_set
from .common import UserError
from .files.captions import (
    CAPTIONS_CSV,
    CAPTIONS_TSV,
    CLASSES_JSON,
    OPEN_CLIP_COLUMNS,
    SKIP_REASONS,
    CaptionClasses,
    CaptionColumns,
    CaptionRow,
    ImageRef,
    read_caption_classes,
    read_caption_shard,
    read_caption_table,
)
from .images import (
    BAD_IMAGE_ERRORS,
    check_max_bad_fraction,
    first_few,
    open_rgb,
    probe_image,
    probe_many,
    why_unreadable,
)

log = logging.getLogger(__name__)

__all__ = [
    "CaptionSet",
    "ImageTextBatch",
    "ImageTextDataset",
    "LabelledImages",
    "caption_splits",
    "collate_image_text",
    "is_caption_source",
    "read_caption_set",
]

TABLE_SUFFIXES = (".csv", ".tsv")


@dataclass
class CaptionSet:
    """The usable (image, caption) pairs of a source, and what was skipped."""

    source: Path
    rows: list[CaptionRow]
    classes: CaptionClasses | None  # from classes.json, where the source has one
    skipped: dict[str, int] = field(default_factory=dict)  # reason (files.captions.SKIP_REASONS) -> rows
    unreadable: list[str] = field(default_factory=list)  # "image (why)" of every image that cannot be read

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.rows]

    @property
    def num_images(self) -> int:
        return len({r.image for r in self.rows})

    @property
    def total(self) -> int:
        """Rows (table) or samples (shards) in the source, usable or not."""
        return len(self.rows) + sum(self.skipped.values())

    def describe(self) -> str:
        """One line: pairs, images, classes, and the skipped rows per reason."""
        classes = f", {len(self.classes.class_names)} classes" if self.classes else ""
        line = f"{self.source}: {len(self.rows)} image-caption pairs of {self.num_images} images{classes}"
        if not self.skipped:
            return line + "; nothing skipped"
        parts = ", ".join(f"{n} {SKIP_REASONS.get(k, k)} ({k})" for k, n in sorted(self.skipped.items()))
        line += f"; skipped {sum(self.skipped.values())} of {self.total}: {parts}"
        return line + (f"; unreadable: {first_few(self.unreadable)}" if self.unreadable else "")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _source_files(source: Path) -> tuple[str, list[Path]]:
    """("table", [the table]) or ("shards", [the shards]); a UserError saying what was expected otherwise."""
    expected = (
        f"expected a caption table (.csv, .tsv), a WebDataset shard (.tar), or a folder holding "
        f"{CAPTIONS_CSV}, {CAPTIONS_TSV} or *.tar shards"
    )
    if source.is_file():
        if source.suffix.lower() in TABLE_SUFFIXES:
            return "table", [source]
        if source.suffix.lower() == ".tar":
            return "shards", [source]
        raise UserError(f"caption source {source}: {expected}")
    if source.is_dir():
        for name in (CAPTIONS_CSV, CAPTIONS_TSV):
            if (source / name).is_file():
                return "table", [source / name]
        shards = sorted(p for p in source.glob("*.tar") if p.is_file())
        if shards:
            return "shards", shards
        splits = [s for s in SPLITS if is_caption_source(str(source / s))]
        if splits:
            raise UserError(
                f"caption source {source}: holds the splits {splits}; name one ({source}/{splits[0]})"
            )
        raise UserError(f"caption source {source}: {expected}")
    raise UserError(f"caption source not found: {source}")


def is_caption_source(spec: str) -> bool:
    """Whether ``spec`` names a caption set: a built-in one, a table, a shard, or a folder of either (or of
    caption splits, as the built-in set's)."""
    if spec in BUILTIN_CAPTIONS:
        return True
    p = Path(spec)
    if p.is_file():
        return p.suffix.lower() in (*TABLE_SUFFIXES, ".tar")
    if not p.is_dir():
        return False
    if any((p / n).is_file() for n in (CAPTIONS_CSV, CAPTIONS_TSV)) or any(p.glob("*.tar")):
        return True
    return any((p / s / n).is_file() for s in SPLITS for n in (CAPTIONS_CSV, CAPTIONS_TSV))


def caption_splits(path: str | os.PathLike[str]) -> list[Path]:
    """``path/train`` and ``path/val`` where they are caption sets (the built-in layout), else ``[path]``."""
    p = Path(path)
    splits = [p / s for s in SPLITS if p.is_dir() and is_caption_source(str(p / s))]
    return splits or [p]


def _find_classes(source: Path) -> CaptionClasses | None:
    folder = source if source.is_dir() else source.parent
    for d in (folder, folder.parent):
        if (d / CLASSES_JSON).is_file():
            return read_caption_classes(d / CLASSES_JSON)
    return None


def _probe_ref(ref: ImageRef) -> tuple[str | None, bool]:
    if not ref.member:
        return probe_image(ref.path)
    try:
        fh = ref.open()
    except OSError as e:
        return why_unreadable(e), False
    return probe_image(fh)


def _check_images(rows: list[CaptionRow], skipped: Counter[str], unreadable: list[str]) -> list[CaptionRow]:
    """The rows whose image decodes; the others counted (per row) as missing or unreadable."""
    refs = list(dict.fromkeys(r.image for r in rows))
    why = {ref: w for ref, (w, _) in zip(refs, probe_many(refs, _probe_ref)) if w is not None}
    unreadable.extend(f"{ref} ({w})" for ref, w in why.items())
    good = []
    for r in rows:
        w = why.get(r.image)
        if w is None:
            good.append(r)
        else:
            skipped["missing_image" if w == "missing" else "unreadable_image"] += 1
    return good


def read_caption_set(
    source: str | os.PathLike[str],
    columns: CaptionColumns = OPEN_CLIP_COLUMNS,
    sep: str | None = None,
    verify_images: bool = True,
    max_bad_fraction: float = 1.0,
) -> CaptionSet:
    """Read a caption source (a table, a shard, or a folder of either): its usable rows and the skipped ones
    counted per reason.

    ``columns`` / ``sep``: a table's column names and separator (default: open_clip's ``filepath``, ``title``;
    "," for .csv, a tab for .tsv). ``verify_images``: decode every image first (``images.probe_image``), so
    that an unreadable one is skipped and counted here. A source without usable rows, or with more than
    ``max_bad_fraction`` of them bad, is a UserError. Labels beyond the classes of ``classes.json`` are bad.
    """
    check_max_bad_fraction(max_bad_fraction)
    source = Path(source)
    kind, files = _source_files(source)
    classes = _find_classes(source)  # a broken classes.json fails before the images are read
    rows: list[CaptionRow] = []
    skipped: Counter[str] = Counter()
    for f in files:
        got, bad = read_caption_table(f, columns, sep) if kind == "table" else read_caption_shard(f)
        rows.extend(got)
        skipped.update(bad)
    if classes is not None:
        n = len(classes.class_names)
        skipped["bad_label"] += sum(r.label >= n for r in rows)
        rows = [r for r in rows if r.label < n]
    unreadable: list[str] = []
    if verify_images:
        log.info("checking the images of %d image-caption pairs in %s", len(rows), source)
        rows = _check_images(rows, skipped, unreadable)
    cs = CaptionSet(source, rows, classes, {k: n for k, n in skipped.items() if n}, unreadable)
    if not rows:
        raise UserError(f"{cs.describe()}: no usable image-caption pairs")
    if sum(cs.skipped.values()) > max_bad_fraction * cs.total:
        raise UserError(
            f"{cs.describe()}; that is more than max_bad_fraction={max_bad_fraction:g} of the rows"
        )
    return cs


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    """Decoding shared by the datasets: an unreadable image gives None (a loader skips it), warned a few times."""

    def __init__(self, transform: Callable[[Image.Image], Any], cache: bool = False) -> None:
        self.transform = transform
        self._warned = 0
        # ``cache``: keep each decoded image (small sets, where PNG decoding, not the model, bounds a step)
        self._decoded: dict[ImageRef, Image.Image] | None = {} if cache else None

    def _image(self, ref: ImageRef) -> Any | None:
        img = self._decoded.get(ref) if self._decoded is not None else None
        if img is None:
            try:
                img = open_rgb(ref.open() if ref.member else ref.path)
            except BAD_IMAGE_ERRORS as e:
                if self._warned < 10:
                    self._warned += 1
                    log.warning("skipping unreadable image %s: %s", ref, why_unreadable(e))
                return None
            if self._decoded is not None:
                self._decoded[ref] = img
        return self.transform(img)


def _tokens(out: Any) -> tuple[torch.Tensor, int | None, int | None]:
    """(tokens [B, L], truncated, empty) of what ``tokenize`` returned: a TokenBatch-like record or a tensor
    (counts unknown)."""
    if isinstance(out, torch.Tensor):
        return out, None, None
    return out.tokens, getattr(out, "truncated", None), getattr(out, "empty", None)


class ImageTextDataset(_Images):
    """``(transform(image) [3, H, W] float, tokens [L] int64)`` per row of a caption set, or None for an image
    that cannot be read (``collate_image_text`` drops it).

    ``tokenize``: list of captions -> ``text.TokenBatch`` (tokens [B, L], truncated, empty) or a bare [B, L]
    tensor (``open_clip.tokenize``). Every caption is tokenized once, here: ``truncated`` / ``empty`` count the
    captions cut at the context length / empty after the tokenizer's cleaning (None where it does not say).
    ``cache``: keep every decoded image in memory (small sets; each data-loader worker keeps its own).
    """

    def __init__(
        self,
        caption_set: CaptionSet,
        tokenize: Callable[[list[str]], Any],
        transform: Callable[[Image.Image], Any],
        chunk: int = 4096,
        cache: bool = False,
    ) -> None:
        super().__init__(transform, cache)
        self.images = [r.image for r in caption_set.rows]
        captions = caption_set.captions
        parts, counts = [], []
        for start in range(0, len(captions), chunk):
            tokens, truncated, empty = _tokens(tokenize(captions[start : start + chunk]))
            parts.append(tokens.to(torch.int32))  # half of int64's memory: vocabularies are far below 2**31
            counts.append((truncated, empty))
        self.tokens = torch.cat(parts)  # [N, L]
        known = all(t is not None and e is not None for t, e in counts)
        self.truncated = sum(t for t, _ in counts) if known else None
        self.empty = sum(e for _, e in counts) if known else None
        log.info(
            "%s: %d captions tokenized to %d tokens; %s truncated, %s empty",
            caption_set.source,
            len(captions),
            self.tokens.shape[1],
            "?" if self.truncated is None else self.truncated,
            "?" if self.empty is None else self.empty,
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor] | None:
        img = self._image(self.images[i])
        return None if img is None else (img, self.tokens[i].long())


class ImageTextBatch(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W]
    tokens: torch.Tensor  # [B, L] int64
    skipped: int  # items dropped: their image could not be read


def collate_image_text(batch: Sequence[tuple[Any, torch.Tensor] | None]) -> ImageTextBatch:
    """Stack (image, tokens) items, dropping None (unreadable) ones; all bad: empty [0] tensors."""
    good = [b for b in batch if b is not None]
    if not good:
        return ImageTextBatch(torch.empty(0), torch.empty(0, dtype=torch.long), len(batch))
    images = torch.stack([torch.as_tensor(b[0]) for b in good])
    return ImageTextBatch(images, torch.stack([b[1] for b in good]), len(batch) - len(good))


class LabelledImages(_Images):
    """``(transform(image), class index)`` per distinct labelled image of a caption set (None where unreadable):
    zero-shot evaluation's input, collated by ``images.collate_skip_bad``."""

    def __init__(self, caption_set: CaptionSet, transform: Callable[[Image.Image], Any]) -> None:
        super().__init__(transform)
        labels = dict.fromkeys((r.image, r.label) for r in caption_set.rows if r.label >= 0)
        if not labels:
            raise UserError(
                f"{caption_set.source}: no image has a class label (a 'label' column or .cls member)"
            )
        self.items = list(labels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        ref, label = self.items[i]
        img = self._image(ref)
        return None if img is None else (img, label)


# ---------------------------------------------------------------------------------------------------------------
# `mobile-vmoe dataset` on a caption source
# ---------------------------------------------------------------------------------------------------------------


def check_caption_source(args: argparse.Namespace, builtin_options: dict[str, Any]) -> int:
    """The dataset verb for caption sets: build a built-in one, or read and check a table, shards or folder,
    printing one summary line per split with its skipped rows."""
    built = args.spec in BUILTIN_CAPTIONS
    d = prepare_caption_set(args.spec, args.root, args.seed, **builtin_options)
    columns = CaptionColumns(args.csv_img_key, args.csv_caption_key, args.csv_label_key)
    for src in caption_splits(d):
        # built-in images are ours; a user's are decoded one by one
        cs = read_caption_set(src, columns, args.csv_separator, not built, args.max_bad_fraction)
        print(cs.describe())
        if cs.classes is not None:
            print(
                f"  classes: {first_few(cs.classes.class_names, 3)}; prompts like {cs.classes.prompts()[0][0]!r}"
            )
    return 0
