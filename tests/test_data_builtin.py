"""Built-in datasets: the synthetic hierarchical generator, scikit-learn's digits, and prepare_dataset's
build-once-and-reuse."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobile_vmoe.builtin_data import (
    BIN_FILL,
    COMPLETE_MARKER,
    FINE_ATTRIBUTES,
    make_digits,
    make_synthetic,
    prepare_dataset,
    synthetic_attributes,
)
from mobile_vmoe.common import UserError
from mobile_vmoe.data import load_superclass_truth, scan_dataset

SMALL = dict(num_superclasses=2, num_fine=3, train_per_class=6, val_per_class=2, image_size=16)


def _digest(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "small", seed=0, **SMALL)


def test_synthetic_layout_classes_and_truth(small):
    idx = scan_dataset(small, num_classes=6)
    assert len(idx.train) == 6 * 6 and len(idx.val) == 6 * 2
    assert idx.class_names == sorted(idx.class_names)
    assert idx.class_names[0].startswith("s0_f0_disk_") and idx.class_names[-1].startswith("s1_f2_square_")
    # each super-class grades its own attribute: s0 the stripe period, s1 the stripe angle
    fine = [n.split("_", 3)[3] for n in idx.class_names]
    assert fine == ["period0", "period1", "period2", "angle0", "angle1", "angle2"]
    for split in (idx.train, idx.val):
        assert [s.target for s in split] == sorted(s.target for s in split)
        assert {s.target for s in split} == set(range(6))
        for s in split:
            assert s.path.split("/")[1] == idx.class_names[s.target]
    with Image.open(small / idx.train[0].path) as im:
        assert im.size == (16, 16) and im.mode == "RGB"

    truth = load_superclass_truth(small)
    assert truth.class_names == idx.class_names
    assert truth.assignment == [0, 0, 0, 1, 1, 1]
    assert truth.assignment == [int(n.split("_")[0][1:]) for n in idx.class_names]
    assert truth.num_superclasses == 2 and truth.sizes == [3, 3]
    meta = json.loads((small / "dataset.json").read_text())
    assert (meta["name"], meta["seed"], meta["num_classes"], meta["image_size"]) == ("synthetic", 0, 6, 16)
    assert (small / COMPLETE_MARKER).is_file()
    assert [p.name for p in small.parent.iterdir()] == ["small"]  # no temporary leftovers


def test_synthetic_deterministic_per_seed(small, tmp_path):
    again = make_synthetic(tmp_path / "again", seed=0, **SMALL)
    assert _digest(again) == _digest(small)
    other = make_synthetic(tmp_path / "other", seed=1, **SMALL)
    a, b = _digest(small), _digest(other)
    assert a.keys() == b.keys()  # same file list ...
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in pngs)  # ... different pixels


def test_synthetic_super_classes_look_alike(small):
    """Coarse property: images of one super-class share a hue far more than images of different ones."""
    idx = scan_dataset(small)
    mean_rgb = {}
    for s in idx.train:
        with Image.open(small / s.path) as im:
            mean_rgb.setdefault(s.target, []).append(np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0))
    sup = [np.mean([np.mean(mean_rgb[c], 0) for c in cs], 0) for cs in ((0, 1, 2), (3, 4, 5))]
    # super-class 0 is red-ish (hue 0), super-class 1 cyan-ish (hue 0.5)
    assert sup[0][0] > sup[0][2] and sup[1][2] > sup[1][0]


def test_synthetic_fine_class_is_a_bin_of_the_super_class_attribute():
    """Class (s, f) puts attribute s in the middle of bin f (a gap to the neighbouring bins); every other
    attribute is nuisance, spread over its whole range."""
    num_fine, n = 10, 400
    for s in (0, 3, 9, 12):
        own = s % len(FINE_ATTRIBUTES)
        for f in (0, 4, 9):
            a = synthetic_attributes(s, f, n, num_fine, np.random.default_rng([s, f]))
            assert a.shape == (len(FINE_ATTRIBUTES), n)
            lo, hi = (f + 0.5 - BIN_FILL / 2) / num_fine, (f + 0.5 + BIN_FILL / 2) / num_fine
            assert a[own].min() >= lo and a[own].max() <= hi
            others = np.delete(a, own, axis=0)
            assert others.min() < 0.02 and others.max() > 0.98


def test_synthetic_default_size_under_60s_extrapolated(tmp_path):
    """Times the default 10 x 10 classes at 12 images per class and extrapolates linearly to the default
    260 + 50 per class (a conservative bound: per-class overheads are counted 26 times over). CPU time, not wall
    time: other work on a shared machine does not count against the generator."""
    t = time.process_time()
    make_synthetic(tmp_path / "d", train_per_class=10, val_per_class=2, seed=0)
    per_image = (time.process_time() - t) / (100 * 12)
    assert per_image * 100 * (260 + 50) < 60.0, f"{per_image * 1e3:.2f} ms per image"
    assert len(scan_dataset(tmp_path / "d", num_classes=100).train) == 1000


def test_synthetic_rejects_bad_sizes(tmp_path):
    with pytest.raises(UserError, match="num_fine"):
        make_synthetic(tmp_path / "x", num_fine=0)
    with pytest.raises(UserError, match="num_fine"):
        make_synthetic(tmp_path / "x", num_fine=19)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits(tmp_path_factory.mktemp("dig") / "digits", image_size=16, val_fraction=0.2, seed=0)


def test_digits_layout_and_split(digits, tmp_path):
    idx = scan_dataset(digits, num_classes=10)
    assert idx.class_names == [f"digit_{c}" for c in range(10)]
    assert len(idx.train) + len(idx.val) == 1797
    counts = np.bincount([s.target for s in idx.train + idx.val], minlength=10)
    val_counts = np.bincount([s.target for s in idx.val], minlength=10)
    assert val_counts.tolist() == [round(0.2 * n) for n in counts]
    assert not {Path(s.path).name for s in idx.train} & {Path(s.path).name for s in idx.val}
    with Image.open(digits / idx.val[0].path) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    assert load_superclass_truth(digits) is None
    meta = json.loads((digits / "dataset.json").read_text())
    assert (meta["name"], meta["num_classes"], meta["image_size"]) == ("digits", 10, 16)

    other = scan_dataset(make_digits(tmp_path / "d1", image_size=16, seed=1))
    assert {s.path for s in other.val} != {s.path for s in idx.val}
    assert len(other.val) == len(idx.val)


def test_digits_deterministic(digits, tmp_path):
    again = make_digits(tmp_path / "again", image_size=16, val_fraction=0.2, seed=0)
    assert _digest(again) == _digest(digits)


def test_prepare_dataset_reuses_and_rebuilds(tmp_path):
    kw = dict(num_superclasses=2, num_fine=2, train_per_class=3, val_per_class=1, image_size=8)
    d = prepare_dataset("synthetic", tmp_path, seed=5, **kw)
    assert d.name.startswith("synthetic-seed5-") and (d / COMPLETE_MARKER).is_file()  # non-default options
    digest = _digest(d)
    (d / "sentinel").write_text("kept if reused")
    assert prepare_dataset("synthetic", tmp_path, seed=5, **kw) == d
    assert (d / "sentinel").is_file()  # complete build reused, not regenerated

    (d / COMPLETE_MARKER).unlink()  # as if interrupted before the marker
    (tmp_path / f".{d.name}.x1y2.tmp" / "train").mkdir(parents=True)  # a killed build's temporary
    (d / "train" / scan_dataset(d).class_names[0]).rename(d / "half")
    assert prepare_dataset("synthetic", tmp_path, seed=5, **kw) == d
    assert not (d / "sentinel").exists() and not (d / "half").exists() and _digest(d) == digest

    d4 = prepare_dataset(
        "synthetic", tmp_path, seed=5, **{**kw, "train_per_class": 4}
    )  # other params: beside
    assert d4 != d and len(scan_dataset(d4).train) == 4 * 4 and len(scan_dataset(d).train) == 3 * 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [d.name, d4.name]
    )

    assert prepare_dataset(str(d)) == d  # an existing directory is used as is
    with pytest.raises(UserError, match="not a built-in dataset"):
        prepare_dataset(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="unknown option"):
        prepare_dataset("digits", tmp_path, bogus=1)


def test_prepare_digits(tmp_path):
    d = prepare_dataset("digits", tmp_path, seed=0, image_size=8)
    assert d.name.startswith("digits-seed0-") and len(scan_dataset(d, num_classes=10).train) > 1000
