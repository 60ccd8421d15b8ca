"""Image-text export: the zero-shot classifier (image path + baked class-prompt embeddings) and the text encoder,
as .pte / .onnx run in the real runtimes against eager, .mlpackage checked structurally, and host-benchmarked.

One untrained LIMoE nano checkpoint (32 px, 3 blocks, E=4, captions of 16 tokens) with class names and prompt
templates; each artifact is exported once per module.
"""

import pytest
import timm
import torch
from fixtures import image_folder
from mobile_vmoe.export import export_model
from mobile_vmoe.export.onnx_export import OnnxRunner
from mobile_vmoe.export.pte import PteRunner

import mobile_vmoe.models  # noqa: F401  (registers the models)
from mobile_vmoe.bench import bench
from mobile_vmoe.builtin_captions import synthetic_captions
from mobile_vmoe.captions import read_caption_set
from mobile_vmoe.checkpoint import ModelMeta, TrainInfo, save_model
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.files.sidecar import read_sidecar
from mobile_vmoe.preprocess import Preprocess
from mobile_vmoe.prompts import class_embeddings
from mobile_vmoe.text import Tokenizer

LIMOE = "mobile_limoe_nano_patch8_32"
KW = {"depth": 3, "num_experts": 4, "context_length": 16}
CLASSES = ["red circle", "green square", "blue triangle"]
TEMPLATES = ["a photo of the {}.", "the {}."]
EXT = {"pte": "pte", "onnx": "onnx", "coreml": "mlpackage"}
TEXTS = ["a red circle", "three small green squares on a dark background", "x"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(LIMOE, **KW).eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("limoe_export")
    meta = ModelMeta(LIMOE, KW, CLASSES, Preprocess.for_model(model), prompt_templates=TEMPLATES)
    return save_model(d / "model.safetensors", model, meta)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """(fmt, part) -> artifact path, each exported on first use."""
    d = tmp_path_factory.mktemp("artifacts")
    data = image_folder(
        d / "images", {"a": 6, "b": 6}, {"a": 6, "b": 6}, size=40
    )  # resized and cropped to 32
    done = {}

    def get(fmt: str, part: str):
        if (fmt, part) not in done:
            out = d / f"{part}.{EXT[fmt]}"
            export_model(fmt, out, checkpoint=ckpt, part=part, num_verify=12, data=data, verbose=False)
            done[fmt, part] = out
        return done[fmt, part]

    return get


def _run(fmt: str, path, x: torch.Tensor) -> torch.Tensor:
    return PteRunner(path)(x) if fmt == "pte" else OnnxRunner(path)(x)


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_zero_shot_classifier_matches_eager(model, exported, fmt):
    path = exported(fmt, "image")
    sc = read_sidecar(f"{path}.json")
    assert (
        sc.kind == "zero_shot_classifier" and sc.class_names == CLASSES and sc.prompt_templates == TEMPLATES
    )
    assert sc.input_shape == [1, 3, 32, 32] and sc.input_dtype == "float32" and sc.routing["kind"] == "token"
    assert sc.details["parity"]["top1_agreement"] == 1.0 and sc.details["parity"]["max_abs_diff"] <= 1e-4
    # Independently of the export code: eager zero-shot logits from the prompts' embeddings.
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.scale() * model.encode_image(x) @ class_embeddings(model, CLASSES, TEMPLATES).t()
    got = _run(fmt, path, x)
    assert got.shape == (5, len(CLASSES))
    assert (got - ref).abs().max() < 1e-4 and torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_text_encoder_matches_eager(model, exported, fmt):
    path = exported(fmt, "text")
    sc = read_sidecar(f"{path}.json")
    assert sc.kind == "text_encoder" and sc.input_shape == [1, 16] and sc.input_dtype == "int64"
    t = sc.text
    assert (t.tokenizer, t.context_length, t.pad_id, t.sot_id, t.eot_id) == (
        "openai-clip-bpe",
        16,
        0,
        49406,
        49407,
    )
    assert sc.embed_dim == 64 and sc.logit_scale == pytest.approx(float(model.scale()))
    p = sc.details["parity"]
    assert p["agreement"] == "text retrieval" and p["top1_agreement"] == 1.0 and p["n_images"] >= 8
    tokens = Tokenizer(16)(TEXTS).tokens  # one caption is cut at the context
    with torch.no_grad():
        ref = model.encode_text(tokens)
    got = _run(fmt, path, tokens)
    assert got.shape == (3, 64) and (got - ref).abs().max() < 1e-4
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_a_trained_checkpoint_verifies_on_its_caption_set(model, tmp_path):
    """Training records its caption set as data_dir: its val images and captions are what export verifies on."""
    caps = synthetic_captions(
        tmp_path / "caps", num_superclasses=2, num_fine=2, train_per_class=2, val_per_class=3
    )
    classes = read_caption_set(caps / "val").classes
    meta = ModelMeta(LIMOE, KW, classes.class_names, Preprocess.for_model(model), TrainInfo(data_dir=str(caps)),
                     prompt_templates=classes.templates)  # fmt: skip
    ckpt = save_model(tmp_path / "model.safetensors", model, meta)
    export_model("onnx", tmp_path / "m.onnx", checkpoint=ckpt, num_verify=8, verbose=False)
    assert read_sidecar(tmp_path / "m.onnx.json").details["images"]["caption_set"] == str(caps / "val")
    export_model("onnx", tmp_path / "t.onnx", checkpoint=ckpt, part="text", num_verify=40, verbose=False)
    p = read_sidecar(tmp_path / "t.onnx.json").details
    assert (
        str(caps / "val") in p["texts"]["texts"] and p["parity"]["n_images"] > 16 + 8
    )  # prompts, samples + captions


@pytest.mark.parametrize("part", ["image", "text"])
def test_coreml_keeps_the_buffers(exported, part):
    s = read_sidecar(f"{exported('coreml', part)}.json").details["mil_structure"]
    # each MoE block: the router and E - 1 more expert pairs over the dense one-tower model's MLP
    assert s["buffers_preserved"] and s["extra_matmul_ops_over_dense"] == s["expected_extra"] == 2 * (
        1 + 2 * 3
    )


@pytest.mark.parametrize(("fmt", "part"), [("pte", "image"), ("onnx", "text")])
def test_host_bench_runs_the_artifacts(exported, tmp_path, fmt, part):
    doc = bench(exported(fmt, part), warmup=1, iterations=3, json_out=tmp_path / "r.json")
    inp = doc["input"]
    if part == "text":
        assert inp == {
            "shape": [1, 16],
            "dtype": "int64",
            "source": "tokens",
            "images": None,
            "preprocess": None,
        }
    else:
        assert inp["shape"] == [1, 3, 32, 32] and inp["dtype"] == "float32"
    assert doc["model"]["sidecar"]["kind"] == ("text_encoder" if part == "text" else "zero_shot_classifier")
    assert len(doc["samples_ms"]) == 3 and (tmp_path / "r.json").is_file()


def test_bad_input_is_one_clear_error(model, ckpt, exported, tmp_path, capsys):
    with pytest.raises(UserError, match="--images"):
        bench(exported("onnx", "text"), warmup=0, iterations=1, images=tmp_path)
    classifier = save_model(
        tmp_path / "cls.safetensors",
        timm.create_model("mobile_vit_nano_patch8_32", num_classes=3),
        ModelMeta(
            "mobile_vit_nano_patch8_32", {"num_classes": 3}, ["a", "b", "c"], Preprocess(size=32, resize=32)
        ),
    )
    with pytest.raises(UserError, match="--part text: .* image classifier"):
        export_model("onnx", tmp_path / "x.onnx", checkpoint=classifier, part="text")
    bare = save_model(
        tmp_path / "bare.safetensors", model, ModelMeta(LIMOE, KW, CLASSES, Preprocess(size=32, resize=32))
    )
    with pytest.raises(UserError, match="lacks.*--part text"):
        export_model("pte", tmp_path / "x.pte", checkpoint=bare)
    with pytest.raises(UserError, match="int8-static"):
        export_model("pte", tmp_path / "x.pte", checkpoint=ckpt, part="text", quantize="int8-static")
    with pytest.raises(UserError, match="--part 'caption'"):
        export_model("onnx", tmp_path / "x.onnx", checkpoint=ckpt, part="caption")
    code = main(["export", "--checkpoint", str(classifier), "--format", "onnx", "--part", "text"])
    assert code == 2 and "--part applies to image-text models" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


@pytest.mark.slow
def test_int8_text_encoder_pte(model, ckpt, tmp_path):
    """Dynamic int8 through the existing quantize path: the token input and the integer routing maths survive."""
    out = tmp_path / "t.pte"
    export_model("pte", out, checkpoint=ckpt, part="text", quantize="int8", num_verify=12, verbose=False)
    sc = read_sidecar(f"{out}.json")
    assert sc.precision == "int8" and sc.details["quantization"]["name"] == "int8"
    assert (
        sc.details["delegation"]["delegated_ops"]["quantized_decomposed_dequantize_per_channel_default"] > 0
    )
    tokens = Tokenizer(16)(TEXTS).tokens
    with torch.no_grad():
        ref = model.encode_text(tokens)
    cos = torch.nn.functional.cosine_similarity(PteRunner(out)(tokens), ref, dim=-1)
    assert cos.min() > 0.99
