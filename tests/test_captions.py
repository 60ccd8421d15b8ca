"""Image-caption data (LIMoE): the built-in synthetic caption set, caption tables and WebDataset shards with
their skipped rows counted, the image-text datasets, and the dataset verb on a caption set."""

import csv
import hashlib
import io
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from mobile_vmoe.builtin_captions import (
    SHAPE_WORDS,
    CaptionVocabulary,
    prepare_caption_set,
    synthetic_captions,
)
from mobile_vmoe.builtin_data import FINE_ATTRIBUTES
from mobile_vmoe.captions import (
    ImageTextDataset,
    LabelledImages,
    caption_splits,
    collate_image_text,
    is_caption_source,
    read_caption_set,
)
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.files.captions import CaptionColumns, read_caption_classes
from mobile_vmoe.files.superclass_map import read_superclass_map
from mobile_vmoe.images import collate_skip_bad
from mobile_vmoe.preprocess import Preprocess

SMALL = dict(num_superclasses=3, num_fine=2, train_per_class=6, val_per_class=2, image_size=16)
CONTEXT = 12


class Tokens(NamedTuple):  # what text.Tokenizer returns: tokens and its counts
    tokens: torch.Tensor
    truncated: int
    empty: int


_TOKENIZER = SimpleTokenizer(context_length=CONTEXT)


def tokenize(texts: list[str]) -> Tokens:
    ids = [_TOKENIZER.encode(t) for t in texts]
    return Tokens(_TOKENIZER(texts), sum(len(i) + 2 > CONTEXT for i in ids), sum(not i for i in ids))


TRANSFORM = Preprocess(size=16, resize=16).transform()


def _png(path: Path, colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write_table(path: Path, header: list[str], rows: list[list[str]], sep: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def _shard(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return prepare_caption_set("synthetic-captions", tmp_path_factory.mktemp("cap"), seed=0, **SMALL)


@pytest.fixture
def table_dir(tmp_path) -> Path:
    """Three good images under img/, one corrupt."""
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _png(tmp_path / "img" / f"{i}.png", c)
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png at all")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Built-in set
# ---------------------------------------------------------------------------------------------------------------


def test_builtin_set_layout_captions_and_classes(builtin):
    assert [p.name for p in caption_splits(builtin)] == ["train", "val"]
    classes = read_caption_classes(builtin / "classes.json")
    names = classes.class_names
    assert len(names) == 6 and len(set(names)) == 6
    assert names[:2] == ["thin-striped red disk", "wide-striped red disk"]  # super-class 0: stripe period
    assert (
        all("{}" in t for t in classes.templates)
        and classes.prompts()[1][0] == "a photo of the wide-striped red disk."
    )
    truth = read_superclass_map(builtin / "superclasses_true.json", names)
    assert truth.assignment == [0, 0, 1, 1, 2, 2]

    train, val = (read_caption_set(builtin / s) for s in ("train", "val"))
    assert (len(train), train.num_images, len(val), val.num_images) == (6 * 6 * 2, 36, 6 * 2, 12)
    assert train.skipped == {} and val.skipped == {} and train.classes.class_names == names
    by_image: dict[str, list[str]] = {}
    for r in train.rows + val.rows:
        name = names[r.label]
        shape = next(k for k, w in SHAPE_WORDS.items() if name.endswith(w[0]) or f" {w[0]} " in name)
        # the class name, word for word up to the shape's synonym
        assert any(name.replace(SHAPE_WORDS[shape][0], w) in r.caption for w in SHAPE_WORDS[shape]), r
        assert Path(r.image.path).parent.name.startswith(f"s{r.label // 2}_f{r.label % 2}_")
        by_image.setdefault(r.image.path, []).append(r.caption)
    assert all(len(set(c)) == 2 for p, c in by_image.items() if "/train/" in p)  # two different wordings
    templates = {c.split(" ")[0] for cs in by_image.values() for c in cs}
    assert len(templates) >= 3  # several sentence templates

    # train and val: disjoint images (not just other file names)
    def digest(cs):
        return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in {r.image.path for r in cs.rows}}

    assert len(digest(train)) == 36 and not digest(train) & digest(val)
    with Image.open(train.rows[0].image.path) as im:
        assert im.size == (16, 16) and im.mode == "RGB"


def test_builtin_set_builds_once_and_deterministically(builtin, tmp_path):
    csv_path = builtin / "train" / "captions.csv"
    before = csv_path.stat().st_mtime_ns
    assert prepare_caption_set("synthetic-captions", builtin.parent, seed=0, **SMALL) == builtin
    assert csv_path.stat().st_mtime_ns == before  # reused, not rebuilt
    again = synthetic_captions(tmp_path / "again", seed=0, **SMALL)
    assert (again / "train" / "captions.csv").read_text() == csv_path.read_text()
    other = synthetic_captions(tmp_path / "other", seed=1, **SMALL)
    assert (other / "train" / "captions.csv").read_text() != csv_path.read_text()
    with pytest.raises(UserError, match="unknown option"):
        prepare_caption_set("synthetic-captions", tmp_path, bogus=1)
    with pytest.raises(UserError, match="num_fine must be"):
        synthetic_captions(tmp_path / "x", num_fine=0)


def test_class_names_stay_distinct_for_any_size():
    for S, F in ((1, 1), (10, 3), (10, 5), (12, 18), (25, 4)):
        v = CaptionVocabulary(S, F)
        assert len(set(v.class_names)) == S * F, (S, F)
        rng = np.random.default_rng(0)
        for c in range(S * F):
            caption = v.caption(c // F, c % F, {a: 0.3 for a, _ in FINE_ATTRIBUTES}, rng)
            assert v.class_names[c].split(" ")[0] in caption
    many = CaptionVocabulary(1, 12)  # more bins than words: ordinals
    assert many.class_names[6] == "red disk of stripe width 7 of 12"


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def test_csv_and_tsv_readers_with_default_and_custom_columns(table_dir):
    _write_table(
        table_dir / "captions.csv",
        ["filepath", "title"],
        [["img/0.png", "a red square"], [str(table_dir / "img/1.png"), "  a green\nsquare "]],
    )
    cs = read_caption_set(table_dir)  # the folder's captions.csv, open_clip's column names
    assert cs.captions == ["a red square", "a green square"]  # whitespace folded
    assert [Path(r.image.path) for r in cs.rows] == [table_dir / "img/0.png", table_dir / "img/1.png"]
    assert all(r.label == -1 for r in cs.rows) and cs.classes is None and cs.skipped == {}

    tsv = _write_table(
        table_dir / "pairs.tsv",
        ["id", "image", "text", "cls"],
        [["1", "img/2.png", "a blue square, small", "2"], ["2", "img/0.png", "red, again", "0"]],
        sep="\t",
    )
    cs = read_caption_set(tsv, CaptionColumns("image", "text", "cls"))
    assert cs.captions == ["a blue square, small", "red, again"] and [r.label for r in cs.rows] == [2, 0]
    # a semicolon table named .csv: the separator is an option
    semi = _write_table(table_dir / "semi.csv", ["filepath", "title"], [["img/1.png", "green"]], sep=";")
    assert read_caption_set(semi, sep=";").captions == ["green"]
    with pytest.raises(UserError, match=r"semi\.csv: no column\(s\) 'filepath', 'title'"):
        read_caption_set(semi)


def test_bad_rows_are_skipped_and_counted_per_reason(table_dir):
    rows = [
        ["img/0.png", "a red square", "0"],
        ["img/1.png", "a green square", "1"],
        ["img/2.png", "a blue square", ""],  # no label: kept, as unknown
        ["", "no path", "0"],
        ["img/1.png", "   ", "1"],
        ["img/missing.png", "gone", "0"],
        ["img/bad.png", "corrupt", "0"],
        ["img/bad.png", "corrupt, twice", "0"],
        ["img/0.png", "wrong label", "x"],
    ]
    path = _write_table(table_dir / "t.csv", ["filepath", "title", "label"], rows)
    cs = read_caption_set(path)
    assert cs.captions == ["a red square", "a green square", "a blue square"]
    assert [r.label for r in cs.rows] == [0, 1, -1]
    assert cs.skipped == {
        "empty_path": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "unreadable_image": 2,  # counted per row
        "bad_label": 1,
    }
    assert cs.total == 9 and len(cs.unreadable) == 2
    text = cs.describe()
    assert "3 image-caption pairs of 3 images" in text and "skipped 6 of 9" in text and "bad.png" in text

    # a classes.json beside the table: labels beyond its classes are bad
    (table_dir / "classes.json").write_text('{"class_names": ["red", "green"]}')
    cs = read_caption_set(path)
    assert cs.skipped["bad_label"] == 1 + 0 and cs.classes.class_names == ["red", "green"]
    _write_table(
        table_dir / "t2.csv", ["filepath", "title", "label"], [["img/2.png", "blue", "2"], *rows[:2]]
    )
    assert read_caption_set(table_dir / "t2.csv").skipped == {"bad_label": 1}

    with pytest.raises(UserError, match="more than max_bad_fraction=0.5"):
        read_caption_set(path, max_bad_fraction=0.5)
    _write_table(table_dir / "none.csv", ["filepath", "title"], [["img/bad.png", "x"], ["", "y"]])
    with pytest.raises(UserError, match="no usable image-caption pairs"):
        read_caption_set(table_dir / "none.csv")
    # verify_images=False: images are met (and skipped) at load time instead
    lazy = read_caption_set(path, verify_images=False)
    assert len(lazy) == 6 and "missing_image" not in lazy.skipped


def test_unreadable_sources_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="caption source not found"):
        read_caption_set(tmp_path / "nope.csv")
    (tmp_path / "latin1.csv").write_bytes("filepath,title\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.csv: not a UTF-8 CSV table"):
        read_caption_set(tmp_path / "latin1.csv")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"expected a caption table \(\.csv, \.tsv\)"):
        read_caption_set(tmp_path / "notes.txt")
    (tmp_path / "broken.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(UserError, match=r"shard .*broken\.tar cannot be read as an uncompressed tar"):
        read_caption_set(tmp_path / "broken.tar")
    _write_table(tmp_path / "t.csv", ["filepath", "title"], [["a.png", "x"]])
    (tmp_path / "classes.json").write_text('{"class_names": ["a", "a"]}')
    with pytest.raises(UserError, match=r"classes\.json: 'class_names' must be"):
        read_caption_set(tmp_path / "t.csv")


# ---------------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------------


def test_shards_count_a_missing_text_and_a_corrupt_image(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    red = _jpeg((255, 0, 0))
    _shard(
        d / "000000.tar",
        {
            "a/0001.jpg": red,
            "a/0001.txt": b"a red square",
            "a/0001.cls": b"0",
            "a/0002.jpg": red,  # no .txt
            "a/0003.jpg": red[: len(red) // 2],  # truncated
            "a/0003.txt": b"half a square",
            "a/0004.txt": b"a caption without its image",
            "a/0005.jpg": red,
            "a/0005.txt": b"  \n ",
            "a/0006.json": b"{}",  # other members are ignored
        },
    )
    blue = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(blue, "PNG")
    _shard(d / "000001.tar", {"b/0001.png": blue.getvalue(), "b/0001.txt": "a blue square, café".encode()})
    assert is_caption_source(str(d)) and is_caption_source(str(d / "000000.tar"))

    cs = read_caption_set(d)
    assert cs.captions == ["a red square", "a blue square, café"] and [r.label for r in cs.rows] == [0, -1]
    assert cs.skipped == {"missing_text": 1, "unreadable_image": 1, "missing_image": 1, "empty_caption": 1}
    assert cs.rows[1].image.member == "b/0001.png" and str(cs.rows[0].image).endswith("000000.tar:a/0001.jpg")
    assert any("a/0003.jpg" in u for u in cs.unreadable)
    assert len(read_caption_set(d / "000001.tar")) == 1

    ds = ImageTextDataset(cs, tokenize, TRANSFORM)
    img, _ = ds[1]  # read in place from the shard
    assert img.shape == (3, 16, 16)
    back = img * torch.tensor(TRANSFORM.transforms[-1].std)[:, None, None]
    back = back + torch.tensor(TRANSFORM.transforms[-1].mean)[:, None, None]
    assert back[2].mean() > 0.95 and back[0].mean() < 0.05  # blue


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def test_image_text_dataset_items_collate_and_token_counts(table_dir):
    long = "a very long caption " * 5
    path = _write_table(
        table_dir / "t.csv",
        ["filepath", "title", "label"],
        [
            ["img/0.png", "red", "0"],
            ["img/1.png", long, "1"],
            ["img/2.png", "!!! ???", "2"],
            ["img/0.png", "red again", "0"],
        ],
    )
    cs = read_caption_set(path)
    ds = ImageTextDataset(cs, tokenize, TRANSFORM)
    assert len(ds) == 4 and (ds.truncated, ds.empty) == (1, 0)
    img, tokens = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert tokens.shape == (CONTEXT,) and tokens.dtype == torch.int64
    assert (
        tokens[0] == _TOKENIZER.sot_token_id
        and tokens[2] == _TOKENIZER.eot_token_id
        and tokens[3:].eq(0).all()
    )
    assert torch.equal(ds[1][1], _TOKENIZER([long])[0])

    batch = collate_image_text([ds[0], None, ds[1]])
    assert batch.images.shape == (2, 3, 16, 16) and batch.tokens.shape == (2, CONTEXT) and batch.skipped == 1
    assert batch.tokens.dtype == torch.int64 and collate_image_text([None]).skipped == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_image_text)
    assert [b.images.shape[0] for b in loader] == [3, 1]

    # a bare tensor from the tokenizer (open_clip.tokenize): counts unknown
    bare = ImageTextDataset(cs, _TOKENIZER, TRANSFORM)
    assert bare.truncated is None and torch.equal(bare.tokens, ds.tokens)

    # an image that became unreadable after the check gives None, and is dropped by the collate
    (table_dir / "img/2.png").write_bytes(b"gone bad")
    assert ds[2] is None and collate_image_text([ds[2], ds[3]]).skipped == 1

    # zero-shot input: each labelled image once, with its class
    images = LabelledImages(cs, TRANSFORM)
    assert len(images) == 3 and images[0][1] == 0 and images[2] is None
    x, y, skipped = collate_skip_bad([images[i] for i in range(3)])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1] and skipped == 1


# ---------------------------------------------------------------------------------------------------------------
# The dataset verb
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_verb_on_a_caption_table(table_dir, capsys):
    path = _write_table(
        table_dir / "pairs.csv",
        ["image", "text"],
        [["img/0.png", "red"], ["img/1.png", "green"], ["img/2.png", ""], ["img/bad.png", "corrupt"]],
    )
    assert main(["dataset", str(path)]) == 2  # open_clip's names are not there
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mobile-vmoe dataset: error: {path}: no column(s) 'filepath', 'title'")
    assert "found ['image', 'text']" in err

    argv = ["dataset", str(path), "--csv-img-key", "image", "--csv-caption-key", "text"]
    assert main(argv) == 2  # 2 of 4 rows bad: over the default max bad fraction 0.01
    assert "that is more than max_bad_fraction=0.01" in capsys.readouterr().err
    assert main([*argv, "--max-bad-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "2 image-caption pairs of 2 images; skipped 2 of 4" in out
    assert "1 empty caption (empty_caption)" in out and "1 image cannot be decoded (unreadable_image)" in out
    assert "img/bad.png" in out


def test_dataset_verb_builds_the_builtin_caption_set(tmp_path, capsys):
    argv = [
        "dataset",
        "synthetic-captions",
        "--root",
        str(tmp_path),
        "--num-superclasses",
        "2",
        "--num-fine",
        "2",
    ]
    assert main([*argv, "--train-per-class", "3", "--val-per-class", "1", "--captions-per-image", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("train: 36 image-caption pairs of 12 images, 4 classes; nothing skipped")
    assert "val: 4 image-caption pairs of 4 images, 4 classes" in out[2]
    assert main(["dataset", "synthetic", "--captions-per-image", "2", "--root", str(tmp_path)]) == 2
    assert "--captions-per-image applies to the synthetic-captions set only" in capsys.readouterr().err
