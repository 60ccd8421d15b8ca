"""Caption-set files: image-caption tables (CSV / TSV), WebDataset tar shards, and ``classes.json``.

Table (open_clip's ``--csv-*`` layout): one row per (image, caption); column ``filepath`` holds the image path
(absolute, or relative to the table's folder) and ``title`` the caption (other names: ``CaptionColumns``); an
optional ``label`` column holds the class index (for zero-shot evaluation). Separator by extension: "," for
``.csv``, a tab for ``.tsv``. An image with several captions has several rows.

Shard (WebDataset layout): an uncompressed ``.tar``; members grouped by key = member path up to the first "." of
its file name (``0001.jpg`` + ``0001.txt``); an image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``) and its UTF-8
caption ``.txt`` make one sample, an optional ``.cls`` holds the class index. Members are read in place (byte
offset + size), so a shard is never unpacked.

``classes.json``: ``{"class_names": [...], "templates": ["a photo of the {}.", ...], ...}``: class i's name
(the class index of a ``label``), usable in the zero-shot prompts ``template.format(name)``.

Readers skip bad rows and count them per reason (``SKIP_REASONS``); a table without its columns or a file that
cannot be read at all is one UserError naming the file.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from ..common import UserError, atomic_path, read_json, write_json_atomic

__all__ = [
    "CAPTIONS_CSV",
    "CAPTIONS_TSV",
    "CLASSES_JSON",
    "OPEN_CLIP_COLUMNS",
    "SHARD_IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "CaptionClasses",
    "CaptionColumns",
    "CaptionRow",
    "ImageRef",
    "read_caption_classes",
    "read_caption_shard",
    "read_caption_table",
    "table_separator",
    "write_caption_classes",
    "write_caption_table",
]

CAPTIONS_CSV = "captions.csv"
CAPTIONS_TSV = "captions.tsv"
CLASSES_JSON = "classes.json"
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the order picks one when a key has several

# Why a row (table) or a sample (shard) was skipped. The readers here count the first five; ``captions`` adds
# the image checks.
SKIP_REASONS = {
    "empty_path": "no image path",
    "empty_caption": "empty caption",
    "bad_label": "label is not a class index",
    "missing_text": "shard image without its .txt",
    "missing_image": "image file or shard image missing",
    "unreadable_image": "image cannot be decoded",
}


class CaptionColumns(NamedTuple):
    """Column names of a caption table (open_clip's ``--csv-img-key`` / ``--csv-caption-key``)."""

    image: str = "filepath"
    caption: str = "title"
    label: str = "label"  # optional: class index of the image


OPEN_CLIP_COLUMNS = CaptionColumns()


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a file, or a member of a tar shard."""

    path: str  # the image file, or the shard holding it
    member: str = ""  # shard: the member's name; "": ``path`` is the image
    offset: int = -1  # shard: byte offset of the member's data in the shard
    size: int = 0  # shard: bytes of the member

    def open(self) -> IO[bytes]:
        """The image as a binary file (a shard member is read into memory: images are small)."""
        if not self.member:
            return open(self.path, "rb")
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return io.BytesIO(fh.read(self.size))

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


class CaptionRow(NamedTuple):
    image: ImageRef
    caption: str  # stripped, non-empty
    label: int  # class index; -1 where the source gives none


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def table_separator(path: str | os.PathLike[str], sep: str | None = None) -> str:
    """``sep`` if given, else by extension: a tab for ``.tsv``, "," otherwise."""
    if sep is not None:
        if len(sep) != 1:
            raise UserError(f"{path}: the column separator must be one character, got {sep!r}")
        return sep
    return "\t" if Path(path).suffix.lower() == ".tsv" else ","


def _open_table(path: Path) -> IO[str]:
    try:
        return open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(f"caption table {path} cannot be read: {e.strerror or e}") from None


def read_caption_table(
    path: str | os.PathLike[str], columns: CaptionColumns = OPEN_CLIP_COLUMNS, sep: str | None = None
) -> tuple[list[CaptionRow], Counter[str]]:
    """The rows of a caption table with an image path and a caption, and the skipped ones counted per reason.

    Relative image paths are taken from the table's folder. The header must name ``columns.image`` and
    ``columns.caption`` (else a UserError naming the file, the expected and the found columns); ``columns.label``
    is read where present. Whether the images exist is not checked here.
    """
    path = Path(path)
    delimiter = table_separator(path, sep)
    base = path.parent
    rows: list[CaptionRow] = []
    skipped: Counter[str] = Counter()
    with _open_table(path) as fh:
        try:
            reader = csv.DictReader(fh, delimiter=delimiter)
            header = reader.fieldnames or []
            missing = [c for c in (columns.image, columns.caption) if c not in header]
            if missing:
                raise UserError(
                    f"{path}: no column(s) {', '.join(map(repr, missing))}; expected an image-path column "
                    f"{columns.image!r} and a caption column {columns.caption!r} separated by {delimiter!r} "
                    f"(found {header}; other names: --csv-img-key / --csv-caption-key)"
                )
            has_label = columns.label in header
            for rec in reader:
                where = (rec.get(columns.image) or "").strip()
                caption = " ".join((rec.get(columns.caption) or "").split())
                label = _label(rec.get(columns.label)) if has_label else -1
                if not where:
                    skipped["empty_path"] += 1
                elif not caption:
                    skipped["empty_caption"] += 1
                elif label is None:
                    skipped["bad_label"] += 1
                else:
                    rows.append(CaptionRow(ImageRef(str(base / where)), caption, label))
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(
                f"{path}: not a UTF-8 {'TSV' if delimiter == chr(9) else 'CSV'} table ({e})"
            ) from None
    return rows, skipped


def _label(text: str | None) -> int | None:
    """A class index from a table cell or a .cls member: an integer >= 0; an empty cell is -1 (unknown)."""
    text = (text or "").strip()
    if not text:
        return -1
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def write_caption_table(
    path: str | os.PathLike[str],
    rows: Sequence[tuple[str, str, int]],
    columns: CaptionColumns = OPEN_CLIP_COLUMNS,
) -> Path:
    """Write (image path, caption, label) rows, atomically; labels go in a ``columns.label`` column."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=table_separator(path), lineterminator="\n")
        writer.writerow([columns.image, columns.caption, columns.label])
        writer.writerows([image, caption, int(label)] for image, caption, label in rows)
    return path


# ---------------------------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------------------------


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: ("dir/0001", "jpg") for "dir/0001.jpg"; the key ends at the first "." of the file
    name, the extension is the rest, lower-cased."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_caption_shard(path: str | os.PathLike[str]) -> tuple[list[CaptionRow], Counter[str]]:
    """The samples of one uncompressed WebDataset shard, and the skipped ones counted per reason.

    A shard that is not an uncompressed tar, or that ends early, is a UserError naming it.
    """
    path = Path(path)
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, str] = {}
    labels: dict[str, int | None] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                if ext in SHARD_IMAGE_EXTENSIONS:
                    kept = images.get(key)
                    rank = SHARD_IMAGE_EXTENSIONS.index
                    if kept is None or rank(ext) < rank(_split_key(kept.name)[1]):
                        images[key] = info
                elif ext in ("txt", "cls"):
                    raw = tar.extractfile(info)
                    text = raw.read().decode("utf-8", errors="replace") if raw is not None else ""
                    if ext == "txt":
                        texts[key] = " ".join(text.split())
                    else:
                        labels[key] = _label(text)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"shard {path} cannot be read as an uncompressed tar: {e}") from None
    rows: list[CaptionRow] = []
    skipped: Counter[str] = Counter()
    for key in sorted(images.keys() | texts.keys()):
        info = images.get(key)
        label = labels.get(key, -1)
        if info is None:
            skipped["missing_image"] += 1
        elif key not in texts:
            skipped["missing_text"] += 1
        elif not texts[key]:
            skipped["empty_caption"] += 1
        elif label is None:
            skipped["bad_label"] += 1
        else:
            ref = ImageRef(str(path), info.name, info.offset_data, info.size)
            rows.append(CaptionRow(ref, texts[key], label))
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------------
# classes.json
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_TEMPLATES = ("a photo of the {}.", "a picture of one {}.")


@dataclass
class CaptionClasses:
    """The classes of a caption set (``classes.json``): class i's name and the zero-shot prompt templates."""

    class_names: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the writer recorded

    def prompts(self) -> list[list[str]]:
        """[C][templates] zero-shot prompts: every template filled with every class name."""
        return [[t.format(name) for t in self.templates] for name in self.class_names]

    def to_dict(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "templates": self.templates, **self.extra}


def write_caption_classes(path: str | os.PathLike[str], c: CaptionClasses) -> Path:
    write_json_atomic(path, c.to_dict())
    return Path(path)


def read_caption_classes(path: str | os.PathLike[str]) -> CaptionClasses:
    """Read and check a ``classes.json``: distinct non-empty names, templates with one "{}" each."""
    obj = read_json(path, "caption classes")
    names = obj.get("class_names") if isinstance(obj, dict) else None
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n.strip() for n in names)
        or len(set(names)) != len(names)
    ):
        raise UserError(f"{path}: 'class_names' must be a non-empty list of distinct class names")
    templates = obj.get("templates", list(DEFAULT_TEMPLATES))
    if (
        not isinstance(templates, list)
        or not templates
        or not all(isinstance(t, str) and t.count("{") == t.count("}") == 1 and "{}" in t for t in templates)
    ):
        raise UserError(f"{path}: 'templates' must be a non-empty list of prompts with one '{{}}' each")
    extra = {k: v for k, v in obj.items() if k not in ("class_names", "templates")}
    return CaptionClasses(list(names), list(templates), extra)
