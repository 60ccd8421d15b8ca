"""Dataset folders: scanning, the held-out split, file lists, loading images (unreadable ones skipped, high bit
depths scaled), check_images, and the ``dataset`` verb."""

import argparse
import io
import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.data import (
    ImageListDataset,
    add_cli,
    check_images,
    collate_skip_bad,
    heldout_split,
    load_superclass_truth,
    make_synthetic,
    scan_dataset,
)
from mobile_vmoe.files.file_list import Sample, read_file_list, write_file_list


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    kw = dict(num_superclasses=2, num_fine=3, train_per_class=6, val_per_class=2, image_size=16)
    return make_synthetic(tmp_path_factory.mktemp("syn") / "small", seed=0, **kw)


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

    # cached: decoded once at construction (the files may go), same items, same bad ones skipped
    order = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    cached = ImageListDataset(data, order, transform=pil_to_tensor, cache=True)
    shutil.rmtree(data)
    for it, c in zip(items, (cached[i] for i in range(len(cached))), strict=True):
        assert (it is None) == (c is None)
        if it is not None:
            torch.testing.assert_close(c[0], it[0])
            assert c[1] == it[1]


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


# --------------------------------------------------------------------------------------------------------------
# High bit depths, palettes, alpha: what loading makes of them
# --------------------------------------------------------------------------------------------------------------


def _png16(path: Path, a: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (PIL writes no 16-bit colour PNG): grey [H, W], grey+alpha [H, W, 2],
    RGB [H, W, 3] (48-bit) or RGBA [H, W, 4] (64-bit)."""
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # PNG: grey, grey+alpha, RGB, RGBA

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


# 16-bit values that a clipping convert("RGB") turns white (anything > 255), and their 8-bit scalings
V16 = np.array([[0, 1000, 30000], [32768, 50000, 65535]], dtype=np.uint16)
V8 = np.round(V16 / 65535 * 255).astype(np.uint8)


def _loaded(data_dir: Path, rel: str) -> np.ndarray:
    """[H, W, 3] uint8, as a training / eval loader sees the image."""
    item = ImageListDataset(data_dir, [Sample(rel, 0)], transform=pil_to_tensor)[0]
    assert item is not None
    assert item[0].dtype == torch.uint8 and item[0].shape[0] == 3
    return item[0].permute(1, 2, 0).numpy()


def test_16_bit_grey_png_is_scaled_not_white(tmp_path):
    _png16(tmp_path / "train/a/grey16.png", V16)
    with Image.open(tmp_path / "train/a/grey16.png") as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("RGB")) == 255).sum() > 3  # the bug: PIL's own conversion clips
    px = _loaded(tmp_path, "train/a/grey16.png")
    np.testing.assert_array_equal(px, np.repeat(V8[..., None], 3, axis=2))


def test_48_and_64_bit_colour_pngs_are_scaled(tmp_path):
    """PIL opens 16-bit colour PNGs as 8-bit RGB / RGBA read from each value's high byte: a correct scaling
    (within 1 of v / 257), so they load as they are; grey+alpha likewise."""
    rgb = np.stack([V16, V16[::-1], 65535 - V16], axis=2)
    _png16(tmp_path / "train/a/rgb48.png", rgb)
    _png16(tmp_path / "train/a/rgba64.png", np.concatenate([rgb, V16[..., None]], axis=2))
    _png16(tmp_path / "train/a/la32.png", np.stack([V16, V16], axis=2))
    want = np.round(rgb / 257.0)
    for name, expected in (
        ("rgb48", want),
        ("rgba64", want),
        ("la32", np.repeat(np.round(V16 / 257.0)[..., None], 3, axis=2)),
    ):
        px = _loaded(tmp_path, f"train/a/{name}.png").astype(int)
        assert np.abs(px - expected).max() <= 1, name


def test_palette_grey_alpha_and_rgba_images(tmp_path):
    d = tmp_path / "train/a"
    d.mkdir(parents=True)
    pal = Image.new("P", (2, 1))
    pal.putpalette([200, 10, 20, 5, 250, 60])
    pal.putpixel((1, 0), 1)
    pal.save(d / "pal.png", transparency=0)  # palette with a transparent entry
    Image.fromarray(np.array([[[10, 0], [200, 255]]], dtype=np.uint8), "LA").save(d / "la.png")
    rgba = np.array([[[1, 2, 3, 0], [250, 128, 7, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(d / "bilevel.png")
    # colour values are kept, alpha dropped (as torchvision's loader)
    np.testing.assert_array_equal(_loaded(tmp_path, "train/a/pal.png"), [[[200, 10, 20], [5, 250, 60]]])
    np.testing.assert_array_equal(_loaded(tmp_path, "train/a/la.png"), [[[10] * 3, [200] * 3]])
    np.testing.assert_array_equal(_loaded(tmp_path, "train/a/rgba.png"), rgba[..., :3])
    np.testing.assert_array_equal(_loaded(tmp_path, "train/a/bilevel.png"), [[[0] * 3, [255] * 3]])


# --------------------------------------------------------------------------------------------------------------
# check_images and the `dataset DIR` check
# --------------------------------------------------------------------------------------------------------------


def _folder(root: Path, good: int, bad: int, png: Path) -> list[Sample]:
    """``good`` copies of png and ``bad`` unreadable files (garbage, truncated, missing in turn) in class a."""
    samples = []
    (root / "train/a").mkdir(parents=True, exist_ok=True)
    raw = png.read_bytes()
    for i in range(good):
        shutil.copy(png, root / f"train/a/ok{i}.png")
        samples.append(Sample(f"train/a/ok{i}.png", 0))
    for i in range(bad):
        p = root / f"train/a/bad{i}.png"
        if i % 3 == 0:
            p.write_bytes(b"not an image" * 20)
        elif i % 3 == 1:
            p.write_bytes(raw[: len(raw) // 2])
        samples.append(Sample(p.relative_to(root).as_posix(), 0))
    return samples


def test_check_images_refuses_a_dataset_of_unreadable_images(small, tmp_path):
    """Training on such a dataset used to finish 'successfully' with untrained weights."""
    png = small / scan_dataset(small).train[0].path
    samples = _folder(tmp_path, good=0, bad=3, png=png)
    with pytest.raises(UserError) as e:
        check_images(tmp_path, samples)
    msg = str(e.value)
    assert "3 of 3 images" in msg and "(100.0 %)" in msg and "max_bad_fraction=0.01" in msg
    assert "train/a/bad0.png (not an image PIL can identify)" in msg
    assert "train/a/bad1.png (OSError" in msg and "train/a/bad2.png (missing)" in msg


def test_check_images_tolerates_a_few_and_names_the_first(small, tmp_path, caplog):
    png = small / scan_dataset(small).train[0].path
    samples = _folder(tmp_path, good=3, bad=1, png=png)
    assert check_images(tmp_path, samples, max_bad_fraction=0.25) == [Sample("train/a/bad0.png", 0)]
    assert "1 of 4 images" in caplog.text and "skipped" in caplog.text
    with pytest.raises(UserError, match=r"1 of 4 images .*\(25.0 %\)"):
        check_images(tmp_path, samples, max_bad_fraction=0.2)
    assert check_images(tmp_path, samples[:3]) == []

    many = _folder(tmp_path / "many", good=1, bad=7, png=png)
    with pytest.raises(UserError, match=r"bad4.png \(.*\) and 2 more; that is more than max_bad_fraction"):
        check_images(tmp_path / "many", many)
    with pytest.raises(UserError, match=r"max_bad_fraction must be in \[0, 1\], got 1.5"):
        check_images(tmp_path, samples, max_bad_fraction=1.5)


def test_check_images_finds_a_truncated_jpeg(tmp_path):
    """JPEGs are decoded at reduced scale for speed; a truncated one is still caught, as the loader fails on it."""
    rng = np.random.default_rng(0)
    (tmp_path / "train/a").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    (tmp_path / "train/a/whole.jpg").write_bytes(buf.getvalue())
    (tmp_path / "train/a/cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    samples = [Sample("train/a/whole.jpg", 0), Sample("train/a/cut.jpg", 0)]
    assert check_images(tmp_path, samples, max_bad_fraction=0.5) == [samples[1]]
    ds = ImageListDataset(tmp_path, samples)
    assert ds[0] is not None and ds[1] is None


def test_dataset_verb_checks_a_folder(small, tmp_path, capsys):
    png = small / scan_dataset(small).train[0].path
    d = tmp_path / "ds"
    _folder(d, good=3, bad=1, png=png)
    _png16(d / "train/b/grey16.png", V16)
    _png16(d / "train/b/rgb48.png", np.stack([V16] * 3, axis=2))
    shutil.copy(png, d / "train/b/plain.png")
    assert main(["dataset", str(d), "--max-bad-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "2 classes, 7 train, 0 val images" in out and "checked 7 images: 6 readable" in out
    assert "1 of 7 images" in out and "train/a/bad0.png (not an image PIL can identify)" in out
    assert "2 images have more than 8 bits per channel" in out
    assert "train/b/grey16.png" in out and "train/b/rgb48.png" in out and "plain.png" not in out

    assert main(["dataset", str(d)]) == 2  # default 0.01
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress line: one line of error, no traceback
    assert last.startswith("mobile-vmoe dataset: error: 1 of 7 images under") and "train/a/bad0.png" in last
    assert "Traceback" not in err
    assert main(["dataset", str(d), "--max-bad-fraction", "2"]) == 2
    assert "max_bad_fraction must be in [0, 1]" in capsys.readouterr().err
