"""The eval stage on model files written with ``save_model`` (no training): what it reads from the model file
(preprocessing, dataset, held-out list, super-classes), moved and copied run directories, the numbers against a
direct computation, and bad input."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.checkpoint import ModelMeta, TrainInfo, load_model, save_model
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError, load_paths
from mobile_vmoe.data import heldout_split, load_superclass_truth, make_synthetic, scan_dataset
from mobile_vmoe.evaluate import evaluate
from mobile_vmoe.files.file_list import Sample, read_file_list, write_file_list
from mobile_vmoe.preprocess import Preprocess

DENSE = ("mobile_vit_nano_patch8_32", dict(depth=2, img_size=16))
MOE = ("mobile_vmoe_nano_patch8_32", dict(depth=3, num_moe_layers=1, num_experts=2, top_k=2, img_size=16))
# not what timm would pick for the model: evaluation must use the record stored in the model file
PRE = Preprocess(size=16, resize=20, interpolation="bilinear", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    kw = dict(num_superclasses=2, num_fine=3, train_per_class=6, val_per_class=2, image_size=24)
    return make_synthetic(tmp_path_factory.mktemp("syn") / "small", seed=0, **kw)


def make_run(run: Path, data: Path, arch=DENSE, superclasses: str | None = None, **kwargs) -> Path:
    """A run directory as training leaves it: heldout.txt, model.safetensors, one checkpoint."""
    index = scan_dataset(data)
    _, held = heldout_split(index.train, fraction=0.3, seed=0)
    write_file_list(run / "heldout.txt", held)
    torch.manual_seed(0)
    name, model_kwargs = arch
    model_kwargs = {**model_kwargs, "num_classes": len(index.class_names), **kwargs}
    model = timm.create_model(name, **model_kwargs)
    train = TrainInfo(data_dir=str(data), heldout_list=str(run / "heldout.txt"), superclasses=superclasses)
    meta = ModelMeta(name, model_kwargs, index.class_names, PRE, train)
    save_model(run / "model.safetensors", model, meta)
    save_model(run / "checkpoints/step_00000001/model.safetensors", model, meta)
    return run


def test_moved_run_dir_reads_its_own_heldout_list(data, tmp_path):
    run = make_run(tmp_path / "run", data)
    n_held = len(read_file_list(run / "heldout.txt", data))
    before = evaluate(run, split="heldout")
    moved = tmp_path / "elsewhere" / "run2"
    moved.parent.mkdir()
    run.rename(moved)
    for where in (moved, moved / "checkpoints/step_00000001"):
        r = evaluate(where, split="heldout")
        assert r["source"] == str(moved / "heldout.txt") and r["split"] == "heldout"
        assert r["num_images"] == n_held and r["top1"] == before["top1"] and r["loss"] == before["loss"]


def test_copied_run_dir_reads_its_own_heldout_list(data, tmp_path):
    run = make_run(tmp_path / "run", data)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    held = read_file_list(copy / "heldout.txt", data)
    write_file_list(copy / "heldout.txt", held[:2])  # the copy's list differs from the original's
    assert evaluate(copy, split="heldout")["num_images"] == 2  # with the original still there
    shutil.rmtree(run)
    r = evaluate(copy, split="heldout")
    assert r["num_images"] == 2 and r["source"] == str(copy / "heldout.txt")

    (copy / "heldout.txt").unlink()
    with pytest.raises(UserError, match=r"its held-out list .*copy/heldout.txt is missing; pass --file-list"):
        evaluate(copy, split="heldout")


def test_moved_dataset_needs_data(data, tmp_path):
    moved = tmp_path / "moved-data"
    shutil.copytree(data, tmp_path / "data")
    run = make_run(tmp_path / "run", tmp_path / "data")
    (tmp_path / "data").rename(moved)
    with pytest.raises(UserError, match=r"the dataset it was trained on, .*data, is not there; pass --data"):
        evaluate(run)
    assert evaluate(run, data_dir=moved)["num_images"] == 12
    assert evaluate(run, data_dir=moved, split="heldout")["num_images"] == len(
        read_file_list(run / "heldout.txt", moved)
    )


def _direct(model_file: Path, data: Path, samples: list[Sample]) -> tuple[torch.Tensor, object]:
    """Logits and routing of the images, preprocessed by hand with the stored record."""
    model, meta = load_model(model_file)
    tf = meta.preprocess.transform()
    x = torch.stack([tf(Image.open(data / s.path)) for s in samples])
    with torch.no_grad():
        return model.forward_with_routing(x)


def test_dense_numbers_match_a_direct_computation(data, tmp_path):
    run = make_run(tmp_path / "run", data)
    val = scan_dataset(data).val
    logits, routing = _direct(run / "model.safetensors", data, val)
    t = torch.tensor([s.target for s in val])
    r = evaluate(run, batch_size=5, json_out=tmp_path / "eval.json")  # batches of 5, 5, 2
    assert routing is None and not r["is_moe"] and "expert_load" not in r
    assert r["num_images"] == len(val) == 12 and r["skipped"] == 0 and r["split"] == "val"
    assert r["top1"] == pytest.approx((logits.argmax(1) == t).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == t[:, None]).any(1).float().mean().item()
    assert r["top5"] == pytest.approx(top5)
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, t).item(), rel=1e-5)
    assert (
        load_paths(json.loads((tmp_path / "eval.json").read_text()), tmp_path / "eval.json", ("checkpoint",))
        == r
    )


def test_moe_routing_statistics_match_a_direct_computation(data, tmp_path):
    truth = data / "superclasses_true.json"
    run = make_run(tmp_path / "run", data, arch=MOE, superclasses=str(truth))
    val = scan_dataset(data).val
    logits, routing = _direct(run / "model.safetensors", data, val)
    t = torch.tensor([s.target for s in val])
    r = evaluate(run, batch_size=4)
    assert r["is_moe"] and (r["num_experts"], r["top_k"]) == (2, 2) and r["superclasses"] == str(truth)

    idx = routing.expert_idx  # [B, K]
    counts = torch.zeros(6, 2, dtype=torch.int64)
    for c, row in zip(t.tolist(), idx.tolist()):
        for e in row:
            counts[c, e] += 1
    assert r["class_expert_counts"] == counts.tolist() and r["expert_load"] == counts.sum(0).tolist()
    first = idx[:, 0]
    assert r["expert_images_top1"] == torch.bincount(first, minlength=2).tolist()
    hit = logits.argmax(1) == t
    for e in range(2):
        n = int((first == e).sum())
        assert r["expert_accuracy"][e] == (
            pytest.approx(float(hit[first == e].float().mean())) if n else None
        )
    super_of = torch.tensor(load_superclass_truth(data).assignment)
    want = (routing.logits.argmax(1) == super_of[t]).float().mean().item()
    assert r["router_accuracy"] == pytest.approx(want)

    assert evaluate(run, superclasses=None)["router_accuracy"] is not None  # found through the metadata
    no_map = make_run(tmp_path / "nomap", data, arch=MOE)
    assert evaluate(no_map)["router_accuracy"] is None and evaluate(no_map)["superclasses"] is None


def test_unreadable_images_are_skipped_and_counted(data, tmp_path):
    shutil.copytree(data, tmp_path / "data")
    run = make_run(tmp_path / "run", tmp_path / "data")
    val = scan_dataset(tmp_path / "data").val
    (tmp_path / "data" / val[0].path).write_bytes(b"broken")
    r = evaluate(run)
    assert (r["num_images"], r["skipped"]) == (11, 1)
    for s in val:
        (tmp_path / "data" / s.path).write_bytes(b"broken")
    with pytest.raises(UserError, match=r"none of the 12 images in .*val could be read"):
        evaluate(run)


def test_bad_input(data, tmp_path):
    run = make_run(tmp_path / "run", data)
    with pytest.raises(UserError, match="split must be 'val' or 'heldout', got 'test'"):
        evaluate(run, split="test")
    with pytest.raises(UserError, match="batch size must be >= 1"):
        evaluate(run, batch_size=0)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{scan_dataset(data).val[0].path}\t6\n")
    with pytest.raises(UserError, match=r"list.txt: class index 6 .* >= number of classes 6"):
        evaluate(run, file_list=lst)
    lst.write_text("")
    with pytest.raises(UserError, match=r"no images to evaluate in .*list.txt"):
        evaluate(run, file_list=lst)
    with pytest.raises(UserError, match="checkpoint not found"):
        evaluate(tmp_path / "nothing")


def test_eval_cli_wrong_kwarg_type_is_one_line(data, tmp_path, capsys):
    """A model file whose model_kwargs hold a value of the wrong type: exit 2 and one line naming the file."""
    run = make_run(tmp_path / "run", data)
    model, meta = load_model(run)
    meta.model_kwargs["depth"] = "two"
    save_model(run / "model.safetensors", model, meta)  # written as is; building it fails
    assert main(["eval", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mobile-vmoe eval: error: {run / 'model.safetensors'}: metadata model_kwargs")
    assert "'depth': 'two'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--checkpoint", str(run), "--split", "heldout"]) == 2
