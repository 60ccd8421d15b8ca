"""The built-in image-caption set: the synthetic generator's images, described in words.

``synthetic_captions`` draws images of S super-classes x F fine classes as ``builtin_data`` does and writes, per
split, ``DIR/<split>/images/<class>/<i>.png`` and ``DIR/<split>/captions.csv`` (docs/FILES.md), plus
``DIR/classes.json`` (class names and zero-shot prompt templates), ``DIR/superclasses_true.json``,
``DIR/dataset.json`` and the ``COMPLETE`` marker. ``prepare_caption_set`` builds it once per option set
(``builtin_data.build_once``).

A caption says what the generator controls: the super-class as a colour (its hue) and a shape family, the fine
class as a word for the bin of its super-class's attribute ("finely striped red disk", "green triangle on the
left"), and zero to two of the image's other, nuisance attributes as they were drawn ("a dark finely striped red
disk near the top"), in one of several sentence templates, with shape synonyms ("disk" / "circle"). The class
name ``colour shape`` + fine word is the zero-shot prompt's object, and every caption holds it word for word
unless a synonym replaced the shape.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .builtin_data import (
    FINE_ATTRIBUTES,
    MAX_FINE,
    SHAPES,
    SUPERCLASSES_TRUE_JSON,
    Builtin,
    build_once,
    fine_attribute,
    render_synthetic_attributes,
    synthetic_class_names,
    write_dataset_json,
)
from .common import UserError, atomic_path
from .files.captions import (
    CAPTIONS_CSV,
    CLASSES_JSON,
    CaptionClasses,
    write_caption_classes,
    write_caption_table,
)
from .files.superclass_map import SuperclassMap, write_superclass_map

__all__ = [
    "BUILTIN_CAPTIONS",
    "CaptionVocabulary",
    "prepare_caption_set",
    "synthetic_captions",
]

SYNTHETIC_CAPTIONS_VERSION = 1  # bump when images or captions change, so that stale builds are redone
SPLITS = ("train", "val")

COLOURS = (
    "red",
    "orange",
    "yellow",
    "lime",
    "green",
    "mint",
    "cyan",
    "azure",
    "blue",
    "violet",
    "magenta",
    "pink",
)
SHAPE_WORDS = {  # the first word is the class name's; the others are synonyms for captions
    "disk": ("disk", "circle", "round blob"),
    "square": ("square", "box"),
    "triangle": ("triangle", "three-sided shape"),
    "ring": ("ring", "hoop", "annulus"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "ellipse": ("ellipse", "oval"),
    "star": ("star", "five-pointed star"),
    "halfdisk": ("half-disk", "semicircle", "half-moon"),
    "hourglass": ("double disk", "pair of circles"),
}


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


class Wording(NamedTuple):
    """How one attribute of ``FINE_ATTRIBUTES`` is said: words from its low to its high values."""

    words: tuple[str, ...]
    before: bool  # an adjective before the colour and shape, else a phrase after them
    cyclic: bool = False  # the attribute wraps around (an angle, a hue)
    noun: str = ""  # what it is, when bins outnumber the words: "... of stripe width 7 of 12"


WORDINGS: dict[str, Wording] = {
    "period": Wording(
        ("finely striped", "thin-striped", "striped", "wide-striped", "broad-striped"),
        True,
        noun="stripe width",
    ),
    # stripes vary along the angle's direction: 0 -> vertical stripes; rising to the right at 45 (y points down)
    "angle": Wording(
        (
            "with vertical stripes",
            "with rising diagonal stripes",
            "with horizontal stripes",
            "with falling diagonal stripes",
        ),
        False,
        cyclic=True,
        noun="stripe angle",
    ),
    "size": Wording(("tiny", "small", "medium", "large", "huge"), True, noun="size"),
    "xpos": Wording(
        ("at the far left", "on the left", "in the centre", "on the right", "at the far right"),
        False,
        noun="horizontal position",
    ),
    "ypos": Wording(
        ("at the very top", "near the top", "in the middle", "near the bottom", "at the very bottom"),
        False,
        noun="height",
    ),
    "contrast": Wording(("low-contrast", "soft", "clear", "crisp", "high-contrast"), True, noun="contrast"),
    "value": Wording(("dark", "dim", "mid-toned", "light", "bright"), True, noun="brightness"),
    "saturation": Wording(("greyish", "dull", "mild", "rich", "vivid"), True, noun="saturation"),
    "bglevel": Wording(
        tuple(f"on a {w} background" for w in ("black", "dark", "dim", "grey", "light")),
        False,
        noun="background level",
    ),
    "bghue": Wording(
        tuple(f"on {_article(c)} {c} background" for c in COLOURS), False, cyclic=True, noun="background hue"
    ),
}
BACKGROUND = ("bglevel", "bghue")  # one caption names at most one of them
BEFORE_ORDER = ("contrast", "value", "saturation", "size", "period")  # adjective order of nuisance words

CAPTION_TEMPLATES = (
    "a photo of {a} {d}.",
    "{a} {d}.",
    "a picture showing {a} {d}.",
    "there is {a} {d} in this picture.",
    "a small image of {a} {d}.",
    "a close-up of {a} {d}.",
    "this is {a} {d}.",
)
PROMPT_TEMPLATES = ("a photo of the {}.", "a picture of one {}.", "the {}.", "a small image of the {}.")


def _word(w: Wording, v: float) -> str:
    """The word for value v in [0, 1): equal bands; a cyclic attribute's bands are centred on 0, 1/n, ..."""
    n = len(w.words)
    return w.words[int(math.floor(v * n + 0.5)) % n] if w.cyclic else w.words[min(int(v * n), n - 1)]


class CaptionVocabulary:
    """The words of S x F synthetic classes: class names (super-class-major) and captions of drawn images."""

    def __init__(self, num_superclasses: int, num_fine: int) -> None:
        self.num_superclasses, self.num_fine = num_superclasses, num_fine
        S = num_superclasses
        self.colours = [COLOURS[int(math.floor(s / S * len(COLOURS) + 0.5)) % len(COLOURS)] for s in range(S)]
        self.shapes = [SHAPES[s % len(SHAPES)] for s in range(S)]
        names = [f"{c} {SHAPE_WORDS[sh][0]}" for c, sh in zip(self.colours, self.shapes)]
        self.numbered = len(set(names)) < S  # more super-classes than colour x shape pairs tell apart
        if self.numbered:
            names = [f"{n} {s}" for s, n in enumerate(names)]
        self.superclass_names = names
        self.fine_words = [self._fine_words(fine_attribute(s)) for s in range(S)]
        self.class_names = [self._join("", s, f, []) for s in range(S) for f in range(num_fine)]

    def _fine_words(self, attr: str) -> list[str]:
        """The word of each fine bin (its centre's word); ordinals when bins outnumber the words."""
        w, F = WORDINGS[attr], self.num_fine
        words = [_word(w, (f + 0.5) / F) for f in range(F)]
        return words if len(set(words)) == F else [f"of {w.noun} {f + 1} of {F}" for f in range(F)]

    def _join(self, before: str, s: int, f: int, after: list[str], shape: str | None = None) -> str:
        """[nuisance adjectives] [fine adjective] colour shape [fine phrase][, nuisance phrases]."""
        word = self.fine_words[s][f]
        fine_before = WORDINGS[fine_attribute(s)].before and not word.startswith("of ")
        core = self.superclass_names[s] if shape is None else f"{self.colours[s]} {shape}"
        phrases = after if fine_before else [word, *after]
        core = f"{word} {core}" if fine_before else core
        return " ".join(p for p in (before, core, ", ".join(phrases)) if p)

    def caption(self, s: int, f: int, attributes: dict[str, float], rng: np.random.Generator) -> str:
        """One caption of an image of class (s, f) drawn with ``attributes`` ({name: value in [0, 1)})."""
        fine = fine_attribute(s)
        others = [a for a, _ in FINE_ATTRIBUTES if a != fine]
        chosen: list[str] = []
        for a in rng.permutation(others)[: rng.integers(0, 3)]:
            if not (a in BACKGROUND and ({fine, *chosen} & set(BACKGROUND))):
                chosen.append(str(a))
        before = " ".join(_word(WORDINGS[a], attributes[a]) for a in BEFORE_ORDER if a in chosen)
        after = [_word(WORDINGS[a], attributes[a]) for a in chosen if not WORDINGS[a].before]
        words = SHAPE_WORDS[self.shapes[s]]
        shape = None if self.numbered else words[rng.integers(len(words))]
        d = self._join(before, s, f, after, shape)
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        return template.format(a=_article(d), d=d)


def _check_options(**options: tuple[Any, int]) -> None:
    """Each option's (value, least value): an integer at least that, else a UserError naming it."""
    for name, (val, lo) in options.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < lo:
            raise UserError(f"synthetic_captions: {name} must be an integer >= {lo}, got {val!r}")


def _draw_captions(
    vocab: CaptionVocabulary,
    s: int,
    f: int,
    attrs: dict[str, np.ndarray],
    i: int,
    k: int,
    rng: np.random.Generator,
) -> list[str]:
    """k captions of image i, distinct where a few redraws find them."""
    values = {a: float(v[i]) for a, v in attrs.items()}
    out: list[str] = []
    for _ in range(4 * k):
        c = vocab.caption(s, f, values, rng)
        if c not in out:
            out.append(c)
        if len(out) == k:
            break
    return (out * k)[:k]


def synthetic_captions(
    out_dir: str | os.PathLike[str],
    num_superclasses: int = 10,
    num_fine: int = 3,
    train_per_class: int = 100,
    val_per_class: int = 20,
    captions_per_image: int = 2,
    val_captions_per_image: int = 1,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write the synthetic image-caption set to ``out_dir`` (atomically; replaces an existing directory).

    Defaults: 10 x 3 = 30 classes, 100 train images with 2 captions each and 20 val images with 1 caption per
    class (3,600 32x32 PNGs; seconds to build). Images and captions of each class come from their own random
    streams of (seed, class, split).
    """
    _check_options(
        num_superclasses=(num_superclasses, 1),
        num_fine=(num_fine, 1),
        train_per_class=(train_per_class, 1),
        val_per_class=(val_per_class, 0),
        captions_per_image=(captions_per_image, 1),
        val_captions_per_image=(val_captions_per_image, 1),
        image_size=(image_size, 8),
    )
    if num_fine > MAX_FINE:
        raise UserError(f"synthetic_captions: num_fine must be <= {MAX_FINE}, got {num_fine}")
    vocab = CaptionVocabulary(num_superclasses, num_fine)
    folders = synthetic_class_names(num_superclasses, num_fine)  # super-class-major, as the class indices
    counts = {"train": (train_per_class, captions_per_image), "val": (val_per_class, val_captions_per_image)}
    params = dict(
        num_superclasses=num_superclasses,
        num_fine=num_fine,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        captions_per_image=captions_per_image,
        val_captions_per_image=val_captions_per_image,
        image_size=image_size,
    )
    with atomic_path(out_dir) as tmp:
        for split_id, split in enumerate(SPLITS):
            count, per_image = counts[split]
            if count == 0:
                continue
            rows: list[tuple[str, str, int]] = []
            for s in range(num_superclasses):
                for f in range(num_fine):
                    label = s * num_fine + f
                    folder = Path("images") / folders[label]
                    (tmp / split / folder).mkdir(parents=True)
                    rng = np.random.default_rng(
                        [seed, s, f, split_id]
                    )  # the pixels' stream, as builtin_data's
                    words_rng = np.random.default_rng([seed, s, f, split_id, 1])
                    for start in range(0, count, 256):  # chunks keep the float64 working set small
                        n = min(256, count - start)
                        imgs, attrs = render_synthetic_attributes(
                            s, f, n, num_superclasses, num_fine, image_size, rng
                        )
                        for i in range(n):
                            rel = (folder / f"{start + i:05d}.png").as_posix()
                            Image.fromarray(imgs[i]).save(tmp / split / rel, format="PNG", compress_level=1)
                            for c in _draw_captions(vocab, s, f, attrs, i, per_image, words_rng):
                                rows.append((rel, c, label))
            write_caption_table(tmp / split / CAPTIONS_CSV, rows)
        _write_classes(tmp, vocab)
        write_dataset_json(
            tmp,
            "synthetic-captions",
            seed,
            len(vocab.class_names),
            image_size,
            params,
            SYNTHETIC_CAPTIONS_VERSION,
        )
    return Path(out_dir)


def _write_classes(d: Path, vocab: CaptionVocabulary) -> None:
    """classes.json (names and prompts) and superclasses_true.json (the super-class of each class)."""
    S, F = vocab.num_superclasses, vocab.num_fine
    extra: dict[str, Any] = {
        "superclass_names": vocab.superclass_names,
        "fine_attributes": [fine_attribute(s) for s in range(S)],
    }
    write_caption_classes(d / CLASSES_JSON, CaptionClasses(vocab.class_names, list(PROMPT_TEMPLATES), extra))
    write_superclass_map(
        d / SUPERCLASSES_TRUE_JSON,
        SuperclassMap(
            assignment=[s for s in range(S) for _ in range(F)],
            class_names=vocab.class_names,
            algorithm="ground-truth",
            params={"coarse": "shape family + hue", "fine": "one attribute per super-class, binned"},
            extra=extra,
        ),
    )


BUILTIN_CAPTIONS: dict[str, Builtin] = {
    "synthetic-captions": Builtin(synthetic_captions, SYNTHETIC_CAPTIONS_VERSION),
}


def prepare_caption_set(
    spec: str, root: str | os.PathLike[str] = "data", seed: int = 0, **kwargs: Any
) -> Path:
    """A ready caption set: ``spec`` "synthetic-captions" is built once under ``root`` (``kwargs`` go to
    ``synthetic_captions``; read ``DIR/train`` and ``DIR/val`` with ``captions.read_caption_set``); any other
    ``spec`` is an existing caption source (a table, a shard or a folder), returned as is."""
    if spec in BUILTIN_CAPTIONS:
        return build_once(spec, BUILTIN_CAPTIONS[spec], root, seed, kwargs)
    if kwargs:
        raise UserError(f"caption set {spec!r}: options {sorted(kwargs)} apply to built-in sets only")
    if not Path(spec).exists():
        raise UserError(
            f"caption set {spec!r}: not a built-in set ({', '.join(BUILTIN_CAPTIONS)}) nor an existing path"
        )
    return Path(spec)
