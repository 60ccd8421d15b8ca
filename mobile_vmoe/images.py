"""Reading image files: the dataset every stage loads images through, and the up-front check of a dataset.

An unreadable image (missing, truncated, corrupt) is skipped where a loader meets it, so that one bad file does
not stop a long training run; ``check_images`` opens every image first, so that a dataset with more than a few
bad files is refused before any training. Images of more than 8 bits per channel are scaled to 8 bits
(``preprocess.to_rgb8``), not clipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from .cli import progress
from .common import UserError
from .files.file_list import Sample
from .preprocess import HIGH_BIT_MODES, to_rgb8

log = logging.getLogger(__name__)

__all__ = [
    "ImageCheck",
    "ImageListDataset",
    "check_images",
    "collate_skip_bad",
    "inspect_images",
    "open_rgb",
    "probe_image",
    "probe_many",
]

# Errors PIL raises for unreadable, truncated or malformed files (SyntaxError: some plugins' "broken" files).
BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_rgb(src: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """An image file (a path, or an open binary file such as a tar member) decoded as 8-bit RGB; raises one of
    ``BAD_IMAGE_ERRORS`` when it cannot be read."""
    with Image.open(src) as im:
        return to_rgb8(im)  # forces a full decode: truncation surfaces here


class ImageListDataset(torch.utils.data.Dataset):
    """Images listed as Samples; ``__getitem__`` gives ``(transform(RGB image), target)``, or None for an image
    that cannot be read (missing, truncated, corrupt), so one bad file does not stop a long training run."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Any] | None = None,
        cache: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.samples = list(samples)
        self.targets = [s.target for s in self.samples]
        self.transform = transform
        self._warned = 0
        self._cache = None
        if cache:  # decoded once, in this process: data-loader workers forked later share the images
            n = len(self.samples)
            self._cache = [self._decode(i) for i in progress(range(n), n, f"decoding {n} images into memory")]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> Image.Image | None:
        s = self.samples[i]
        try:
            return open_rgb(self.data_dir / s.path)
        except BAD_IMAGE_ERRORS as e:
            if self._warned < 10:
                self._warned += 1
                log.warning("skipping unreadable image %s: %s", self.data_dir / s.path, why_unreadable(e))
            return None

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        img = self._cache[i] if self._cache is not None else self._decode(i)
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[i].target


def collate_skip_bad(batch: Sequence[tuple[Any, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate (image tensor, target) items, dropping None (unreadable) ones: ``(images, targets, n_skipped)``.

    If every item was bad, images is an empty [0] tensor and targets an empty int64 tensor.
    """
    good = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), n_skipped
    images = torch.stack([torch.as_tensor(b[0]) for b in good])
    targets = torch.tensor([int(b[1]) for b in good], dtype=torch.long)
    return images, targets, n_skipped


# ---------------------------------------------------------------------------------------------------------------
# Checking a dataset before using it
# ---------------------------------------------------------------------------------------------------------------


class ImageCheck(NamedTuple):
    """What ``inspect_images`` found."""

    total: int  # images opened
    unreadable: list[tuple[Sample, str]]  # (image, why PIL cannot read it)
    high_bit_depth: list[Sample]  # more than 8 bits per channel: loading scales them to 8


def why_unreadable(e: Exception) -> str:
    """A few words on why PIL could not read an image."""
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"{type(e).__name__}: {e}"


def _more_than_8_bits(im: Image.Image) -> bool:
    # 16-bit grey opens as "I;16"; 48- and 64-bit PNGs open as RGB / RGBA read from the high bytes, which only
    # the raw mode of the decoder ("RGB;16B") tells
    return im.mode in HIGH_BIT_MODES or any(";16" in str(tile.args) for tile in im.tile)


def probe_image(src: str | os.PathLike[str] | IO[bytes]) -> tuple[str | None, bool]:
    """(why the image ``src`` (a path or an open binary file) cannot be read, or None; whether it has more than
    8 bits per channel)."""
    try:
        with Image.open(src) as im:
            deep = _more_than_8_bits(im)
            # A JPEG decodes at 1/8 scale: every byte is still read (truncation shows), in a fraction of the time.
            im.draft(im.mode, (1, 1))
            im.load()
    except BAD_IMAGE_ERRORS as e:
        return why_unreadable(e), False
    return None, deep


def probe_many(
    srcs: Sequence[Any],
    probe: Callable[[Any], tuple[str | None, bool]] = probe_image,
    desc: str = "checking images",
) -> list[tuple[str | None, bool]]:
    """``probe(src)`` of every src (default ``probe_image``: a path or an open file), in threads, with progress."""
    from tqdm import tqdm

    out: list[tuple[str | None, bool]] = []
    chunk = 1024  # bounds the futures in flight on a million-image dataset
    # PIL's decoders release the GIL, so threads decode in parallel
    with (
        ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
        tqdm(total=len(srcs), desc=desc, unit="img", disable=None) as bar,
    ):
        for start in range(0, len(srcs), chunk):
            part = srcs[start : start + chunk]
            out.extend(pool.map(probe, part))
            bar.update(len(part))
    return out


def inspect_images(data_dir: str | os.PathLike[str], samples: Sequence[Sample]) -> ImageCheck:
    """Open and decode every image of ``samples`` (paths relative to ``data_dir``)."""
    data_dir = Path(data_dir)
    unreadable: list[tuple[Sample, str]] = []
    deep: list[Sample] = []
    log.info("checking %d images under %s", len(samples), data_dir)
    for s, (why, more_bits) in zip(samples, probe_many([data_dir / s.path for s in samples])):
        if why is not None:
            unreadable.append((s, why))
        elif more_bits:
            deep.append(s)
    return ImageCheck(len(samples), unreadable, deep)


def check_max_bad_fraction(max_bad_fraction: float) -> None:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")


def first_few(items: Sequence[str], n: int = 5) -> str:
    """``a, b, c and 7 more``: a listing of files that stays one line."""
    text = ", ".join(items[:n])
    return text + (f" and {len(items) - n} more" if len(items) > n else "")


def describe_unreadable(data_dir: str | os.PathLike[str], found: ImageCheck) -> str:
    n = len(found.unreadable)
    listing = first_few([f"{s.path} ({why})" for s, why in found.unreadable])
    return f"{n} of {found.total} images under {data_dir} cannot be read ({100 * n / found.total:.1f} %): {listing}"


def require_readable(
    data_dir: str | os.PathLike[str], found: ImageCheck, max_bad_fraction: float
) -> list[Sample]:
    """The unreadable images of ``found``; a UserError naming them when more than ``max_bad_fraction`` are."""
    bad = [s for s, _ in found.unreadable]
    if bad and len(bad) / found.total > max_bad_fraction:
        raise UserError(
            f"{describe_unreadable(data_dir, found)}; that is more than max_bad_fraction={max_bad_fraction:g}: "
            "fix or remove them"
        )
    return bad


def check_images(
    data_dir: str | os.PathLike[str], samples: Sequence[Sample], max_bad_fraction: float = 0.01
) -> list[Sample]:
    """Open every image of ``samples``; return the unreadable ones (loaders skip them).

    More than ``max_bad_fraction`` of them unreadable is a UserError naming the first few, so that a broken
    dataset fails before training rather than training on nothing.
    """
    check_max_bad_fraction(max_bad_fraction)
    found = inspect_images(data_dir, samples)
    bad = require_readable(data_dir, found, max_bad_fraction)
    if bad:
        log.warning("%s; they are skipped", describe_unreadable(data_dir, found))
    return bad
