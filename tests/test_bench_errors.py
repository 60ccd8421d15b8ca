"""Bad model files and results: each is one UserError naming the file, never a crash or a traceback."""

import json
import logging
import shutil
import warnings

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper
from PIL import Image

import mobile_vmoe.bench as B
import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.files.sidecar import Sidecar, write_sidecar
from mobile_vmoe.preprocess import Preprocess


def _sidecar(fmt: str, artifact: str, size: int, pre_size: int | None = None) -> Sidecar:
    pre = pre_size or size
    return Sidecar(
        format=fmt, artifact=artifact, model="mobile_vit_nano_patch8_32", model_kwargs={}, class_names=["a", "b", "c"],
        input_shape=[1, 3, size, size], preprocess=Preprocess(size=pre, resize=pre), precision="fp32",
    )  # fmt: skip


def _onnx_graph(path, shape, op="Identity", domain=""):
    """A one-node ONNX model (x -> op -> y), opset 17."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A dense 64 px ViT as .onnx (no sidecar) and three 40 x 40 images."""
    d = tmp_path_factory.mktemp("bench_errors")
    torch.manual_seed(0)
    model = timm.create_model("mobile_vit_nano_patch8_32", img_size=64, depth=1, num_classes=3).eval()
    onnx_path = d / "m64.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(onnx_path), dynamo=False)
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return {"onnx": onnx_path, "images": images}


def test_random_bytes_pte_is_one_user_error(tmp_path, capsys):
    pte = tmp_path / "random.pte"
    pte.write_bytes(np.random.default_rng(0).bytes(4096))  # the ExecuTorch runtime aborts on this
    with pytest.raises(UserError, match=r"random\.pte: not a loadable ExecuTorch program"):
        B.bench(pte, iterations=1)
    assert main(["bench", str(pte), "--iterations", "1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"mobile-vmoe bench: error: {pte}: not a loadable ExecuTorch program")


def test_garbage_onnx_is_one_user_error(tmp_path):
    rand = tmp_path / "random.onnx"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")  # parses as an empty ModelProto: no graph input
    unknown = _onnx_graph(tmp_path / "unknown_op.onnx", [1, 3, 8, 8], op="NoSuchOp", domain="vmoe.test")
    for path in (rand, empty, unknown):  # the last one fails only when ONNX Runtime builds the session
        with pytest.raises(UserError, match=rf"{path.name}: not a loadable ONNX model"):
            B.bench(path, warmup=0, iterations=1)


def test_sidecar_of_another_model_is_refused(small, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copyfile(small["onnx"], model)
    write_sidecar(model, _sidecar("onnx", model.name, 64))
    _onnx_graph(model, [1, 3, 64, 64])  # another model copied over it
    with pytest.raises(UserError, match=r"model\.onnx: does not match its sidecar .*model\.onnx\.json"):
        B.bench(model, iterations=1)
    pte = tmp_path / "model.pte"
    pte.write_bytes(b"one program")
    write_sidecar(pte, _sidecar("pte", pte.name, 64))
    pte.write_bytes(b"another program")
    # the phone driver refuses it before it looks for any tool
    with pytest.raises(UserError, match=r"model\.pte: does not match its sidecar"):
        B.bench_device("android", pte, json_out=tmp_path / "r.json")


def test_model_of_another_input_with_images(small, tmp_path):
    model = tmp_path / "m64.onnx"
    shutil.copyfile(small["onnx"], model)
    # A sidecar written before sidecars had a digest, for a 32 px model: the 64 px file passes the digest check.
    (tmp_path / "m64.onnx.json").write_text(json.dumps(_sidecar("onnx", model.name, 32).to_dict()))
    with pytest.raises(
        UserError,
        match=r"m64\.onnx: its input is \[1, 3, 64, 64\], but --images are preprocessed to \[1, 3, 32, 32\]",
    ):
        B.bench(model, iterations=3, images=small["images"])
    vector = _onnx_graph(tmp_path / "vector.onnx", [1, 10])  # not an image model at all
    with pytest.raises(UserError, match=r"vector\.onnx: its input is \[1, 10\]"):
        B.bench(vector, iterations=3, images=small["images"])
    assert B.bench(vector, warmup=0, iterations=2)["input"]["shape"] == [1, 10]  # random input: fine


def test_images_without_sidecar_and_progress_lines(small, caplog):
    caplog.set_level(logging.INFO, logger="mobile_vmoe.bench")
    doc = B.bench(small["onnx"], warmup=1, iterations=4, images=small["images"])
    assert doc["input"]["preprocess"] == Preprocess(size=64, resize=64).to_dict()  # the model's input size
    assert doc["input"]["images"]["count"] == 3 and doc["stats"]["count"] == 4
    assert "bench m64.onnx: 5/5 runs" in caplog.messages  # stderr is no terminal here: plain lines, no bar


def test_report_names_the_file_with_nan_samples(small, tmp_path, capsys):
    doc = B.bench(small["onnx"], warmup=0, iterations=3, isolate=False)
    doc["samples_ms"][1] = float("nan")
    bad = tmp_path / "nan.json"
    bad.write_text(json.dumps(doc))  # Python writes NaN and reads it back
    with pytest.raises(UserError, match=r"nan\.json: \$\.samples_ms\[1\] is nan"):
        B.report([bad], out_dir=tmp_path / "r")
    assert main(["bench", "report", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"{bad}: $.samples_ms[1]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
