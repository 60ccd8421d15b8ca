"""Super-class discovery (mobile_vmoe.superclasses) and the held-out confusion matrix it starts from
(mobile_vmoe.confusion): planted partitions, degenerate matrices, bad input, the CLI, a real checkpoint."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from fixtures import planted_confusion
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import mobile_vmoe.models  # noqa: F401
from mobile_vmoe.checkpoint import ModelMeta, TrainInfo, save_model
from mobile_vmoe.cli import main
from mobile_vmoe.clustering import _balance, _with_epsilon, affinity
from mobile_vmoe.common import UserError
from mobile_vmoe.confusion import heldout_confusion, read_confusion, write_confusion
from mobile_vmoe.files.superclass_map import read_superclass_map
from mobile_vmoe.preprocess import Preprocess
from mobile_vmoe.superclasses import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    confusion_graph,
    find_superclasses,
    partition_confusion,
)


def assert_balanced(a, n, k):
    a = np.asarray(a)
    assert a.shape == (n,) and a.dtype.kind == "i"
    sizes = np.bincount(a, minlength=k)
    assert len(sizes) == k and sizes.min() >= n // k and sizes.max() <= -(-n // k), sizes
    assert sizes.max() / sizes.min() <= 1.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recovers_planted_partition(seed):
    C, truth = planted_confusion([10] * 10, seed)
    a = partition_confusion(C, 10, seed=seed)
    assert_balanced(a, 100, 10)
    assert adjusted_rand_score(truth, a) >= 0.95


def test_unequal_planted_groups_as_close_as_balance_allows():
    rng = np.random.default_rng(5)
    sizes = [10] * 10
    for _ in range(3):  # move classes between random groups: sizes 8..12
        i, j = rng.choice(10, 2, replace=False)
        sizes[i] -= 1
        sizes[j] += 1
    C, truth = planted_confusion(sizes, 5)
    a = partition_confusion(C, 10)
    assert_balanced(a, 100, 10)
    # the best a balanced answer can do: the truth itself, balanced by the same step
    oracle = _balance(_with_epsilon(affinity(C, normalize=True)), truth.copy(), 10)
    best = adjusted_rand_score(truth, oracle)
    assert best < 1.0
    assert adjusted_rand_score(truth, a) >= best - 0.03


def test_confusion_graph_weights():
    C = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 5]])
    G = confusion_graph(C)
    assert sorted(G.nodes) == [0, 1, 2] and G.number_of_edges() == 1  # no self-loops, no zero edges
    assert G[0][1]["weight"] == pytest.approx(2 / 10 + 1 / 4)  # row-normalised, symmetrised
    assert confusion_graph(C, normalize=False)[0][1]["weight"] == 3


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != DEFAULT_ALGORITHM])
def test_other_algorithms_valid_and_sensible(algorithm):
    C, truth = planted_confusion([10] * 10, 3, within=0.3, between=0.1)
    a = partition_confusion(C, 10, algorithm=algorithm)
    assert_balanced(a, 100, 10)
    assert adjusted_rand_score(truth, a) >= 0.8


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_e_not_dividing_n(algorithm):
    C, _ = planted_confusion([5, 5, 5, 4, 4], 1)
    a = partition_confusion(C, 5, algorithm=algorithm)
    assert_balanced(a, 23, 5)
    assert sorted(np.bincount(a).tolist()) == [4, 4, 5, 5, 5]
    a3 = partition_confusion(C, 7, algorithm=algorithm)  # 23 = 2*3 + 5*... -> sizes 3 or 4
    assert_balanced(a3, 23, 7)


def _degenerate_matrices():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 5, size=(6, 6))
    disconnected = np.zeros((12, 12), dtype=np.int64)
    disconnected[:6, :6] = block
    disconnected[6:, 6:] = block.T
    never = rng.integers(0, 4, size=(12, 12))
    never[[2, 7]] = 0
    never[:, [2, 7]] = 0
    never[2, 2] = never[7, 7] = 30  # always right, never predicted for anything else
    zero_rows = rng.integers(0, 4, size=(12, 12))
    zero_rows[[0, 5, 11]] = 0  # no held-out images of these classes
    diag_only = np.diag(np.arange(1, 13))
    return {
        "disconnected": disconnected,
        "never_confused": never,
        "zero_rows": zero_rows,
        "all_zero": np.zeros((12, 12)),
        "diagonal_only": diag_only,
    }


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", list(_degenerate_matrices()))
def test_degenerate_graphs_still_balanced(algorithm, case):
    C = _degenerate_matrices()[case]
    for k in (1, 4, 5, 12):
        assert_balanced(partition_confusion(C, k, algorithm=algorithm), 12, k)


def test_disconnected_blocks_are_found():
    C = _degenerate_matrices()["disconnected"]
    a = partition_confusion(C, 2)
    assert adjusted_rand_score([0] * 6 + [1] * 6, a) == 1.0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_deterministic(algorithm):
    C, _ = planted_confusion(
        [10] * 6, 7, within=0.15, between=0.25, lo=5, hi=15
    )  # noisy: ties and choices happen
    a = partition_confusion(C, 6, algorithm=algorithm, seed=3)
    b = partition_confusion(C.copy(), 6, algorithm=algorithm, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a[0] == 0  # numbered by first class


@pytest.mark.parametrize(
    "C, k, field",
    [
        (np.zeros((3, 4)), 2, "square"),
        (np.array([[1, -1], [0, 2]]), 1, "negative"),
        (np.array([[1.0, np.nan], [0, 2]]), 1, "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), 1, "numeric"),
        (np.eye(3), 4, r"--num-superclasses must be an integer in \[1, number of classes = 3\], got 4"),
        (np.eye(3), 0, r"--num-superclasses must be an integer in \[1, number of classes = 3\], got 0"),
        (np.eye(3), 1.5, "--num-superclasses must be an integer"),
    ],
)
def test_bad_matrix_or_e(C, k, field):
    with pytest.raises(UserError, match=field):
        partition_confusion(C, k)


def test_bad_files(tmp_path):
    out = tmp_path / "out"
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([[{"a": 1}, None], [1, 2]], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"--confusion .*obj\.npy.*not a readable numeric"):
        find_superclasses(out, 2, confusion=obj)
    strs = tmp_path / "str.npy"
    np.save(strs, np.array([["1", "2"], ["3", "4"]]))
    with pytest.raises(UserError, match=r"--confusion .*str\.npy.*numeric"):
        find_superclasses(out, 2, confusion=strs)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not a numpy file")
    with pytest.raises(UserError, match="junk.npy"):
        find_superclasses(out, 2, confusion=junk)
    with pytest.raises(UserError, match="not found"):
        find_superclasses(out, 2, confusion=tmp_path / "missing.npy")
    ok = tmp_path / "ok.npy"
    np.save(ok, np.eye(3))
    with pytest.raises(UserError, match=r"in \[1, number of classes = 3\], got 4"):
        find_superclasses(out, 4, confusion=ok)
    with pytest.raises(UserError, match=r"in \[1, number of classes\], got 0"):
        find_superclasses(out, 0, confusion=tmp_path / "missing.npy")  # E is checked first
    with pytest.raises(UserError, match="exactly one of --checkpoint"):
        find_superclasses(out, 2)
    with pytest.raises(UserError, match="--algorithm"):
        find_superclasses(out, 2, confusion=ok, algorithm="nope")
    assert not out.exists()  # nothing written on bad input


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mobile_vmoe.cli", "superclasses", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_end_to_end_with_confusion(tmp_path, capsys):
    C, truth = planted_confusion([4] * 5, 2, within=0.3, between=0.1)
    np.save(tmp_path / "conf.npy", C)
    data = tmp_path / "data"
    data.mkdir()
    names = [f"cls{i:02d}" for i in range(20)]
    (data / "superclasses_true.json").write_text(
        json.dumps({"assignment": truth.tolist(), "class_names": names})
    )
    out = tmp_path / "out"
    r = _run_cli("--confusion", tmp_path / "conf.npy", "--num-superclasses", 5, "--out", out, "--data", data)
    assert r.returncode == 0, r.stderr
    res = read_superclass_map(out / "superclasses.json")
    assert res.class_names == names and res.num_superclasses == 5 and res.algorithm == DEFAULT_ALGORITHM
    assert res.sizes == [4] * 5 and len(res.assignment) == 20
    assert res.assignment == partition_confusion(C, 5).tolist()
    assert res.ari_vs_truth == pytest.approx(adjusted_rand_score(truth, res.assignment))
    a = np.array(res.assignment)
    off = C * (1 - np.eye(20))
    assert res.within_mass == pytest.approx(off[a[:, None] == a[None, :]].sum() / off.sum())
    assert 0.0 < res.within_mass <= 1.0
    assert (out / "superclasses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "superclasses.md").read_text()
    assert all(f"- {n}\n" in md for n in names) and md.count("## Super-class") == 5
    assert not list(out.glob(".*tmp"))  # no temp files left behind

    # in-process: the subprocess above already covered the entry point
    assert (
        main(["superclasses", "--confusion", str(tmp_path / "conf.npy"), "-E", "21", "--out", str(out)]) == 2
    )
    assert (
        "--num-superclasses must be an integer in [1, number of classes = 20], got 21"
        in capsys.readouterr().err
    )
    argv = ["--confusion", str(tmp_path / "conf.npy"), "-E", "3", "--out", str(tmp_path / "o3")]
    assert main(["superclasses", *argv, "--algorithm", "kernighan_lin"]) == 0
    assert sorted(read_superclass_map(tmp_path / "o3" / "superclasses.json").sizes) == [6, 7, 7]


def _tiny_run(tmp_path, num_classes=4, per_class=3, model_kwargs=None):
    """Tiny dataset (PNG images + held-out list) and a random-weight dense checkpoint that points at them;
    ``model_kwargs`` go into the file's metadata only (the weights are those of the plain model)."""
    data = tmp_path / "data"
    names = [f"c{i}" for i in range(num_classes)]
    lines = []
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        d = data / "train" / n
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{j}.png")
            lines.append(f"train/{n}/{j}.png\t{i}\n")
    (data / "superclasses_true.json").write_text(
        json.dumps({"assignment": [i % 2 for i in range(num_classes)], "class_names": names})
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "heldout.txt").write_text("".join(lines))
    torch.manual_seed(0)
    model = timm.create_model("mobile_vit_nano_patch4_32", num_classes=num_classes)
    meta = ModelMeta(
        "mobile_vit_nano_patch4_32",
        {"num_classes": num_classes, **(model_kwargs or {})},
        names,
        Preprocess(size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        TrainInfo(data_dir=str(data), heldout_list=str(run / "heldout.txt")),
    )
    ckpt = save_model(run / "model.safetensors", model, meta)
    return ckpt, model, data, names, lines


def test_checkpoint_end_to_end(tmp_path):
    ckpt, model, data, names, lines = _tiny_run(tmp_path)
    # an unreadable image is skipped, not fatal
    (data / "train" / "c3" / "2.png").write_bytes(b"broken")
    out = tmp_path / "out"
    res = find_superclasses(out, 2, checkpoint=ckpt)
    C = np.load(out / "confusion.npy")
    assert C.shape == (4, 4) and C.sum() == len(lines) - 1
    assert C[3].sum() == 2 and C[:3].sum(axis=1).tolist() == [3, 3, 3]
    # the confusion matrix is the model's own predictions on the held-out images (eval transform)
    from timm.data import create_transform

    tf = create_transform(
        input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic", crop_pct=1.0
    )
    x = torch.stack([tf(Image.open(data / ln.split("\t")[0]).convert("RGB")) for ln in lines[:3]])
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    assert C[0].tolist() == np.bincount(pred.numpy(), minlength=4).tolist()
    rows = (out / "confusion.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == names and len(rows) == 5
    assert res.class_names == names and res.sizes == [2, 2] and res.ari_vs_truth is not None
    assert "checkpoint" in res.params
    assert (out / "superclasses.png").is_file() and (out / "superclasses.md").is_file()

    # --data overrides the checkpoint's data_dir: a moved dataset still works
    moved = tmp_path / "moved"
    data.rename(moved)
    r = _run_cli("--checkpoint", ckpt.parent, "--data", moved, "-E", 2, "--out", tmp_path / "out2")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "out2" / "confusion.npy"), C)
    with pytest.raises(UserError, match="dataset directory not found"):
        find_superclasses(tmp_path / "out3", 2, checkpoint=ckpt)


def test_checkpoint_errors(tmp_path):
    ckpt, *_ = _tiny_run(tmp_path)
    (ckpt.parent / "heldout.txt").unlink()
    with pytest.raises(UserError, match="held-out list not found"):
        find_superclasses(tmp_path / "out", 2, checkpoint=ckpt)
    with pytest.raises(UserError, match=r"--num-superclasses .*number of classes = 4\], got 5"):
        find_superclasses(tmp_path / "out", 5, checkpoint=ckpt)
    with pytest.raises(UserError, match="checkpoint not found"):
        find_superclasses(tmp_path / "out", 2, checkpoint=tmp_path / "nope.safetensors")
    assert not (tmp_path / "out").exists()


def test_confusion_files_round_trip(tmp_path):
    from mobile_vmoe.confusion import Confusion

    conf = Confusion(np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]]), ["a", "b", "c"], tmp_path)
    assert conf.empty_classes == ["b"] and conf.num_images == 7 and conf.accuracy == pytest.approx(5 / 7)
    paths = write_confusion(tmp_path / "conf", conf)
    assert [p.name for p in paths] == ["confusion.npy", "confusion.csv", "classes.json"]
    back = read_confusion(tmp_path / "conf")
    assert back.counts.tolist() == conf.counts.tolist() and back.counts.dtype == np.int64
    assert back.class_names == ["a", "b", "c"] and back.data_dir == tmp_path
    (tmp_path / "conf" / "classes.json").write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(UserError, match=r"classes\.json: 'class_names' must list the 3 classes"):
        read_confusion(tmp_path / "conf")


def test_class_without_heldout_images_lands_in_a_superclass_with_a_warning(tmp_path, caplog):
    ckpt, _model, _data, names, lines = _tiny_run(tmp_path)
    # class c3 had too few images to hold any out (heldout_split leaves a 1-image class whole): no line
    (ckpt.parent / "heldout.txt").write_text("".join(ln for ln in lines if not ln.endswith("\t3\n")))
    conf = heldout_confusion(ckpt)
    assert conf.counts[3].tolist() == [0, 0, 0, 0] and conf.empty_classes == ["c3"]

    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    res = find_superclasses(out, 2, checkpoint=ckpt)
    assert len(res.assignment) == 4 and res.sizes == [2, 2]  # c3 still has a super-class
    assert len(res.warnings) == 1
    assert "1 class(es) had no held-out images" in res.warnings[0] and res.warnings[0].endswith(": c3")
    assert read_superclass_map(out / "superclasses.json").warnings == res.warnings
    assert f"**Warning:** {res.warnings[0]}" in (out / "superclasses.md").read_text()
    assert res.warnings[0] in caplog.text
    assert read_confusion(out).empty_classes == ["c3"]


def test_all_zero_or_diagonal_matrix_gives_an_arbitrary_partition_with_a_warning(tmp_path, capsys):
    np.save(tmp_path / "zero.npy", np.zeros((6, 6), dtype=np.int64))
    out = tmp_path / "out"
    assert (
        main(["superclasses", "--confusion", str(tmp_path / "zero.npy"), "-E", "2", "--out", str(out)]) == 0
    )
    m = read_superclass_map(out / "superclasses.json")
    assert m.sizes == [3, 3] and len(m.warnings) == 1
    assert "all zero" in m.warnings[0] and "arbitrary" in m.warnings[0]
    assert m.warnings[0] in (out / "superclasses.md").read_text()
    assert f"warning: {m.warnings[0]}" in capsys.readouterr().out

    diag = find_superclasses(tmp_path / "diag", 3, confusion=np.diag([5, 4, 3, 2, 1, 6]))
    assert len(diag.warnings) == 1 and "diagonal" in diag.warnings[0]
    # one super-class, or one per class: nothing arbitrary was chosen
    assert find_superclasses(tmp_path / "one", 1, confusion=np.zeros((6, 6))).warnings == []
    assert find_superclasses(tmp_path / "all", 6, confusion=np.zeros((6, 6))).warnings == []


def test_num_superclasses_zero_names_the_flag_and_range(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.eye(3))
    argv = ["superclasses", "--confusion", str(tmp_path / "c.npy"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--num-superclasses", "0"]) == 2
    err = capsys.readouterr().err
    assert "--num-superclasses must be an integer in [1, number of classes], got 0" in err
    assert "4611686018427387904" not in err
    ckpt, *_ = _tiny_run(tmp_path)
    assert main(["superclasses", "--checkpoint", str(ckpt), "-E", "9", "--out", str(tmp_path / "out")]) == 2
    assert (
        "--num-superclasses must be an integer in [1, number of classes = 4], got 9"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_a_wrong_typed_model_kwarg_is_one_clear_error(tmp_path, capsys):
    ckpt, *_ = _tiny_run(tmp_path, model_kwargs={"depth": "two"})
    rc = main(["superclasses", "--checkpoint", str(ckpt), "-E", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mobile-vmoe superclasses: error: ") and str(ckpt) in last
    assert "model_kwargs" in last and "'two'" in last
    assert not (tmp_path / "out").exists()
