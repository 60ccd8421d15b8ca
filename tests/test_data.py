import argparse
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mobile_vmoe.common import UserError
from mobile_vmoe.data import (
    BIN_FILL,
    COMPLETE_MARKER,
    FINE_ATTRIBUTES,
    ImageListDataset,
    add_cli,
    collate_skip_bad,
    heldout_split,
    load_superclass_truth,
    make_digits,
    make_synthetic,
    prepare_dataset,
    scan_dataset,
    synthetic_attributes,
)
from mobile_vmoe.files.file_list import Sample, read_file_list, write_file_list

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
    260 + 50 per class (a conservative bound: per-class overheads are counted 26 times over)."""
    t = time.perf_counter()
    make_synthetic(tmp_path / "d", train_per_class=10, val_per_class=2, seed=0)
    per_image = (time.perf_counter() - t) / (100 * 12)
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


def _samples(sizes: list[int]) -> list[Sample]:
    return [Sample(f"train/c{c}/{i:04d}.png", c) for c, n in enumerate(sizes) for i in range(n)]


def test_heldout_split_per_class_rules():
    samples = _samples([1, 2, 5, 300, 1000])
    rest, held = heldout_split(samples, fraction=0.01, min_per_class=2, seed=0)
    assert set(rest).isdisjoint(held) and len(rest) + len(held) == len(samples)
    assert set(rest) | set(held) == set(samples)
    held_counts = np.bincount([s.target for s in held], minlength=5).tolist()
    # n=1: nothing (training keeps one); n=2: one; n=5: min 2; n=300: max(2, 3); n=1000: 1% = 10
    assert held_counts == [0, 1, 2, 3, 10]
    assert [s for s in samples if s in set(rest)] == rest  # input order kept

    rest10, held10 = heldout_split(samples, fraction=0.1, min_per_class=0, seed=0)
    assert np.bincount([s.target for s in held10], minlength=5).tolist() == [0, 0, 0, 30, 100]


def test_heldout_split_deterministic_and_seeded():
    samples = _samples([50, 80])
    a = heldout_split(samples, fraction=0.1, seed=3)
    assert heldout_split(samples, fraction=0.1, seed=3) == a
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert set(heldout_split(shuffled, fraction=0.1, seed=3)[1]) == set(a[1])  # input order does not matter
    assert set(heldout_split(samples, fraction=0.1, seed=4)[1]) != set(a[1])
    with pytest.raises(UserError, match="fraction"):
        heldout_split(samples, fraction=1.0)


def test_file_list_round_trip(small, tmp_path):
    idx = scan_dataset(small)
    rest, held = heldout_split(idx.train, fraction=0.2, seed=0)
    lst = tmp_path / "run" / "heldout.txt"
    write_file_list(lst, held)
    assert lst.read_text().splitlines()[0] == f"{held[0].path}\t{held[0].target}"
    assert read_file_list(lst, small) == held
    assert [p.name for p in lst.parent.iterdir()] == ["heldout.txt"]


@pytest.mark.parametrize(
    "line, match",
    [
        ("train/x.png", r":2: expected 'relative/path<TAB>class_index'"),
        ("{p}\t1\textra", r":2: expected"),
        ("{p}\tcat", r":2: class index must be an integer >= 0"),
        ("{p}\t-1", r":2: class index must be an integer >= 0"),
        ("train/nope/missing.png\t0", r":2: 'train/nope/missing.png' does not exist"),
        ("../outside.png\t0", r":2: path '../outside.png' must be relative"),
    ],
)
def test_file_list_errors(small, tmp_path, line, match):
    good = scan_dataset(small).train[0]
    (small.parent / "outside.png").write_bytes((small / good.path).read_bytes())
    lst = tmp_path / "list.txt"
    lst.write_text(f"{good.path}\t{good.target}\n" + line.format(p=good.path) + "\n")
    with pytest.raises(UserError, match=match) as e:
        read_file_list(lst, small)
    assert str(lst) in str(e.value)
    (small.parent / "outside.png").unlink()


def test_file_list_missing_file(tmp_path):
    with pytest.raises(UserError, match="file list not found"):
        read_file_list(tmp_path / "none.txt", tmp_path)


def _tree(root: Path, png: Path, files: list[str]) -> Path:
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        if f.endswith("/"):
            continue
        shutil.copy(png, p)
    return root


def test_scan_dataset_layout_and_errors(small, tmp_path):
    png = small / scan_dataset(small).train[0].path
    ok = _tree(
        tmp_path / "ok", png, ["train/b/1.png", "train/a/2.JPG", "train/a/sub/3.png", "train/a/notes.txt"]
    )
    idx = scan_dataset(ok)
    assert idx.class_names == ["a", "b"] and idx.val == []  # val/ is optional
    assert idx.train == [
        Sample("train/a/2.JPG", 0),
        Sample("train/a/sub/3.png", 0),
        Sample("train/b/1.png", 1),
    ]

    with pytest.raises(UserError, match=r"no train/ folder"):
        scan_dataset(_tree(tmp_path / "notrain", png, ["val/a/1.png"]))
    with pytest.raises(UserError, match=r"train/c: class folder holds no images"):
        scan_dataset(_tree(tmp_path / "empty", png, ["train/a/1.png", "train/c/", "train/c/readme.txt"]))
    with pytest.raises(UserError, match=r"val: class folder\(s\) \['z'\] not present in .*train"):
        scan_dataset(_tree(tmp_path / "valextra", png, ["train/a/1.png", "val/a/1.png", "val/z/1.png"]))
    with pytest.raises(UserError, match=r"found 2 class folders, expected num_classes=3"):
        scan_dataset(ok, num_classes=3)
    with pytest.raises(UserError, match="dataset directory not found"):
        scan_dataset(tmp_path / "nothing")


def test_bad_images_yield_none_and_are_counted(small, tmp_path):
    idx = scan_dataset(small)
    good = idx.train[:3]
    data = tmp_path / "d"
    for s in good:
        (data / s.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small / s.path, data / s.path)
    raw = (small / good[0].path).read_bytes()
    (data / "train/bad").mkdir()
    (data / "train/bad/truncated.png").write_bytes(raw[: len(raw) // 2])
    (data / "train/bad/garbage.png").write_bytes(b"not an image at all" * 10)
    bad = [
        Sample("train/bad/truncated.png", 0),
        Sample("train/bad/garbage.png", 1),
        Sample("train/bad/gone.png", 2),
    ]
    ds = ImageListDataset(data, [good[0], bad[0], good[1], bad[1], bad[2], good[2]], transform=pil_to_tensor)
    items = [ds[i] for i in range(len(ds))]
    assert [it is None for it in items] == [False, True, False, True, True, False]
    images, targets, n_skipped = collate_skip_bad(items)
    assert n_skipped == 3
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert targets.tolist() == [s.target for s in good] and targets.dtype == torch.long
    with Image.open(small / good[1].path) as im:
        torch.testing.assert_close(images[1], pil_to_tensor(im.convert("RGB")))

    # through a real DataLoader, as training uses it
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad)
    assert sum(n for _, _, n in loader) == 3 and sum(len(t) for _, t, _ in loader) == 3
    empty_images, empty_targets, n = collate_skip_bad([None, None])
    assert (empty_images.numel(), empty_targets.numel(), n) == (0, 0, 2)


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


def test_load_superclass_truth_validates(tmp_path):
    (tmp_path / "superclasses_true.json").write_text(json.dumps({"assignment": [0, 1], "class_names": ["a"]}))
    with pytest.raises(UserError, match="superclasses_true.json"):
        load_superclass_truth(tmp_path)


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(
        ["dataset", "synthetic", "--root", str(tmp_path), "--num-superclasses", "2", "--num-fine", "2"]
        + ["--train-per-class", "2", "--val-per-class", "1", "--image-size", "8"]
    )
    assert args.func(args) == 0
    assert "4 classes, 8 train, 4 val images" in capsys.readouterr().out
