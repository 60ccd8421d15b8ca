"""Export stage: every format for a tiny dense and a tiny MoE checkpoint, run in its real runtime (ExecuTorch,
ONNX Runtime) or inspected (Core ML MIL program), int8, the --model path, and bad input / failed verification
leaving nothing behind."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mobile_vmoe.export import VerificationError, export_model
from mobile_vmoe.export.core import remove_stale_temporaries
from mobile_vmoe.export.quantize import int8_candidates, select_fp32_layers, simulated_int8
from safetensors.torch import save_file

from mobile_vmoe.checkpoint import ModelMeta, load_model, save_model
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.config import load_config
from mobile_vmoe.files.sidecar import exported_from, read_sidecar
from mobile_vmoe.train import train

DENSE, MOE = "mobile_vit_nano_patch4_32", "mobile_vmoe_nano_patch4_32"
EXT = {"pte": ".pte", "onnx": ".onnx", "coreml": ".mlpackage"}
NUM_VERIFY = 24  # enough for the agreement figures; lowering, not verifying, is the slow part


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A dense and a MoE run of the quick preset (2 blocks, width 64, 16 px, 3 experts), ~3 s each."""
    tmp = tmp_path_factory.mktemp("export_runs")
    out = {}
    for kind, name in (("dense", DENSE), ("moe", MOE)):
        cfg = load_config(
            "quick", [f"data.root={tmp / 'data'}", f"out={tmp / kind}", "threads=1", f"model={name}"]
        )
        out[kind] = train(cfg)
    return out


def only(d: Path) -> list[str]:
    """Everything in d, hidden temporaries included (a failed export must leave none)."""
    return sorted(p.name for p in d.iterdir())


def verify_images(run: Path, n: int = 6) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and n real held-out images, normalised, read independently of the export stage."""
    from PIL import Image

    model, meta = load_model(run)
    pre = meta.preprocess
    data_dir = Path(meta.train.data_dir)
    lines = Path(meta.train.heldout_list).read_text().splitlines()[:n]
    xs = []
    for line in lines:
        img = Image.open(data_dir / line.split("\t")[0]).convert("RGB")
        assert img.size[0] == img.size[1]  # square: resizing the shorter side is resizing both
        img = img.resize((pre.resize, pre.resize), getattr(Image, pre.interpolation.upper()))
        o = (pre.resize - pre.size) // 2
        img = img.crop((o, o, o + pre.size, o + pre.size))
        a = (np.asarray(img, dtype=np.float32) / 255 - np.asarray(pre.mean)) / np.asarray(pre.std)
        xs.append(torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32)))
    return model, torch.stack(xs)


def run_artifact(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    if fmt == "pte":
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(path).load_method("forward")
        return torch.cat([method.execute([x[i : i + 1].contiguous()])[0] for i in range(x.shape[0])])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def killed_writers(*targets: tuple[Path, str]) -> list[Path]:
    """The temporaries that writers killed inside ``common.atomic_path(target, suffix)`` leave behind: one
    process enters every (target, suffix) and is killed before any rename."""
    code = (
        "import os, sys; from mobile_vmoe.common import atomic_path\n"
        "for target, suffix in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    tmp = atomic_path(target, suffix=suffix).__enter__()\n"
        "    tmp.write_bytes(b'half-written'); print(tmp, flush=True)\n"
        "os._exit(9)"
    )
    args = [str(a) for target in targets for a in target]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    left = [Path(line) for line in run.stdout.split()]
    assert run.returncode == 9 and len(left) == len(targets) and all(p.exists() for p in left)
    assert all(p.parent == t.parent for p, (t, _) in zip(left, targets))
    return left


def coreml_class_labels(spec) -> list[str]:
    """The class names held by the ML program's classify op (an immediate list of strings)."""
    f = spec.mlProgram.functions["main"]
    op = next(op for op in f.block_specializations[f.opset].operations if op.type == "classify")
    values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
    return [v.immediateValue.tensor.strings.values[0] for v in values]


# --------------------------------------------------------------------------------------------------------------
# Every format, dense and MoE
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("fmt", ["pte", "onnx", "coreml"])
def test_export_verifies_and_writes_sidecar(runs, tmp_path, fmt, kind):
    out = tmp_path / f"m{EXT[fmt]}"
    # a killed export's half-written artifact and sidecar: cleaned before this export starts
    killed_writers((out, EXT[fmt]), (out.with_name(out.name + ".json"), ""))
    got = export_model(fmt, out, checkpoint=runs[kind], num_verify=NUM_VERIFY, verbose=False)
    assert got == out and out.exists()
    assert only(tmp_path) == [out.name, out.name + ".json"]
    sc = read_sidecar(tmp_path / (out.name + ".json"))
    side = sc.details  # the verification report
    assert sc.checkpoint == str((runs[kind] / "model.safetensors").resolve())  # what `bench` reads
    if fmt == "onnx":  # a resumed pipeline keeps the file only while the model file is the one it came from
        ckpt = tmp_path / "ckpt.safetensors"
        ckpt.write_bytes((runs[kind] / "model.safetensors").read_bytes())
        assert exported_from(out, ckpt) and not exported_from(tmp_path / "none.onnx", ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:-1] + b" ")  # retrained since: another digest
        assert not exported_from(out, ckpt)
        ckpt.unlink()
    assert sc.model == (MOE if kind == "moe" else DENSE) and sc.random_weights is False
    assert sc.is_moe is (kind == "moe")
    assert (
        sc.preprocess == load_model(runs[kind])[1].preprocess
    )  # one preprocessing, copied from the model file
    assert sc.sha256 is not None and sc.file_size_bytes > 10_000
    net = load_model(runs[kind])[0]
    routing = {"E": net.num_experts, "K": net.top_k, "L": net.num_moe_layers}
    assert sc.routing == (routing if kind == "moe" else None) and (kind == "dense" or routing["E"] == 3)
    assert torch.__version__.startswith(side["versions"]["torch"])
    model, x = verify_images(runs[kind])
    if fmt == "coreml":
        assert sc.precision == "fp16" and side["coreml"]["minimum_deployment_target"] == "iOS17"
        s = side["mil_structure"]
        ops = (s["moe"] if kind == "moe" else s["dense"])["op_counts"]
        assert ops.get("linear", 0) + ops.get("matmul", 0) > 0
        if kind == "moe":
            # on top of the dense twin's matmuls only the router's projection and, with K > 1, each MoE
            # block's gated fc2 bias (gates @ b2): no per-expert copies
            gated_bias = routing["L"] if routing["K"] > 1 else 0
            assert s["sparse_compute_preserved"] and s["extra_matmul_ops_over_dense"] == 1 + gated_bias
            shapes = [g["shape"][0] for g in s["moe"]["expert_weight_gathers"]]  # fc1, fc2 of each MoE block
            assert len(shapes) >= 2 * routing["L"] and set(shapes) == {3}
            assert (
                ops.get("reduce_argmax", 0) + ops.get("topk", 0) >= 1
            )  # the router's choice is in the program
        import coremltools as ct

        spec = ct.utils.load_spec(str(out))
        assert (
            spec.description.input[0].type.WhichOneof("Type") == "imageType"
        )  # pixels in, normalised inside
        assert spec.description.predictedFeatureName == "classLabel"
        assert coreml_class_labels(spec) == load_model(runs[kind])[1].class_names
        return
    assert sc.precision == "fp32"
    p = side["parity"]
    assert p["n_images"] >= NUM_VERIFY and p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    # The artifact on disk is what was verified: rerun it here against eager PyTorch.
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(run_artifact(fmt, out, x), ref, atol=1e-4)
    if fmt == "onnx":
        assert sc.expert_dispatch == ("switch" if kind == "moe" else None)
        b = p["batched"]  # the same images in one batch: a MoE's gather form for mixed routing
        assert b["max_abs_diff"] <= 1e-4 and b["top1_agreement"] == 1.0
    if fmt == "pte":
        d = side["delegation"]
        assert d["backend"] == "XnnpackBackend" and d["num_delegated_subgraphs"] >= 1
        assert d["delegated_ops"].get("aten_linear_default", 0) >= 1
        assert isinstance(d["portable_ops"], dict)  # reported, even where empty
        # The XNNPACK rewrite ran: every attention and norm, and none of them left on portable kernels.
        n_blocks = len(net.blocks) + len(net.moe_blocks)
        moe = kind == "moe"
        assert d["rewrites"] == {
            "attention": n_blocks,
            "layer_norm": 2 * n_blocks + 1 + moe,
            "router_pool": moe,
        }
        left = {"aten_native_layer_norm_default", "aten_where_self", "aten_bmm_default", "aten_mean_dim"}
        assert not left & set(d["portable_ops"])
        if not moe:  # one subgraph after the class token's concat
            assert d["num_delegated_subgraphs"] <= 2 and sc.expert_dispatch is None
        else:
            # The expert switch: the router's topk and each MoE block's cond split the main graph (L + 2
            # subgraphs), and every expert is a delegate of its own in a cond branch (E * L); no gather.
            E, L = routing["E"], routing["L"]
            assert sc.expert_dispatch == "switch" and d["num_delegated_subgraphs"] == L + 2 + E * L
            assert (
                d["portable_ops"]["cond"] == L * (E - 1)
                and "aten_index_select_default" not in d["portable_ops"]
            )


@pytest.mark.parametrize("scheme", ["int8", "int8-static"])
def test_int8_pte_agrees(runs, tmp_path, scheme):
    out = tmp_path / "moe_int8.pte"
    export_model("pte", out, checkpoint=runs["moe"], quantize=scheme, num_verify=NUM_VERIFY, verbose=False)
    sc = read_sidecar(tmp_path / "moe_int8.pte.json")
    side = sc.details
    q = side["quantization"]
    assert sc.precision == "int8" and q["name"] == scheme
    # the static scheme is calibrated on real training images; the dynamic one needs none
    assert (q["calibration_images"] > 0) == (scheme == "int8-static")
    p = side["parity"]
    assert p["min_top1_agreement"] == 0.99 and p["top1_agreement"] >= 0.99  # enforced: trained weights
    dq = [k for k in side["delegation"]["delegated_ops"] if "quantize" in k]
    assert dq, side["delegation"]  # int8 (de)quantize nodes went to XNNPACK
    # the experts are spliced in after quantization: cond branches, no gather; int8 under the dynamic scheme
    assert sc.expert_dispatch == "switch"
    assert "aten_index_select_default" not in side["delegation"]["portable_ops"]
    if scheme == "int8-static":  # no calibration reaches the experts
        assert side["delegation"]["int8_expert_mlps"] == 0
    if scheme == "int8":
        # Every transformer linear is a candidate (qkv, proj, fc1, fc2 of a dense block; qkv, proj and the
        # expert MLP of a MoE block; never the head or the router), and all but the ones the accuracy check
        # kept fp32 are int8.
        net = load_model(runs["moe"])[0]
        candidates = int8_candidates(net)
        experts = {f"moe_blocks.{i}.mlp" for i in range(len(net.moe_blocks))}
        assert len(candidates) == 4 * len(net.blocks) + 3 * len(net.moe_blocks) and experts <= set(candidates)
        assert set(q["fp32_layers"]) <= set(candidates)
        n_int8 = side["delegation"]["delegated_ops"].get(
            "quantized_decomposed_dequantize_per_channel_default", 0
        )
        int8_experts = len(experts - set(q["fp32_layers"]))  # each: 2 linears per expert, in cond branches
        assert side["delegation"]["int8_expert_mlps"] == int8_experts
        linears = len(set(candidates) - experts) - len(set(q["fp32_layers"]) - experts)
        assert n_int8 == linears + 2 * sc.routing["E"] * int8_experts
        choice = q["layer_choice"]  # chosen on held-out images that verification does not use
        assert choice["images"] > 0 and choice["fp32_layers"] == q["fp32_layers"]
        assert choice["simulated_agreement"] >= choice["target_agreement"] or not n_int8


def test_model_with_random_weights_through_cli(runs, tmp_path, capsys):
    out = tmp_path / "rand.onnx"
    data = load_model(runs["moe"])[1].train.data_dir
    code = main(
        ["export", "--model", MOE, "--model-kwargs", "depth=2", "img_size=16", "num_experts=4",
         "--format", "onnx", "--out", str(out), "--data", data, "--num-verify", "8",
         "--expert-dispatch", "gather"]
    )  # fmt: skip
    assert code == 0
    assert "RANDOM weights" in capsys.readouterr().out
    sc = read_sidecar(tmp_path / "rand.onnx.json")
    assert sc.random_weights is True and sc.checkpoint is None
    assert sc.model_kwargs == {"depth": 2, "img_size": 16, "num_experts": 4}
    assert sc.routing == {"E": 4, "K": 1, "L": 2} and sc.details["parity"]["top1_agreement"] == 1.0
    assert any("random weights" in n for n in sc.details["notes"])
    assert sc.expert_dispatch == "gather"  # as asked, instead of the default switch


# --------------------------------------------------------------------------------------------------------------
# Bad input and failed verification: a clear error, nothing left behind
# --------------------------------------------------------------------------------------------------------------


def test_bad_input_is_a_user_error_before_any_work(runs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UserError, match="checkpoint not found"):
        export_model("pte", bad / "m.pte", checkpoint=tmp_path / "nope.safetensors")
    other = bad / "other.safetensors"  # another architecture: right format tag, weights of something else
    save_file(
        {"fc.weight": torch.zeros(2, 2)},
        str(other),
        metadata={"format": "mobile-vmoe/1", "model": DENSE, "model_kwargs": "{}", "class_names": "[]"},
    )
    with pytest.raises(UserError, match="weights do not match"):
        export_model("onnx", bad / "m.onnx", checkpoint=other)
    foreign = bad / "foreign.safetensors"  # not ours at all
    save_file({"w": torch.zeros(1)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not a mobile-vmoe model file"):
        export_model("onnx", bad / "m.onnx", checkpoint=foreign)
    with pytest.raises(UserError, match="Core ML gathers"):
        export_model("coreml", bad / "m.mlpackage", checkpoint=runs["moe"], expert_dispatch="switch")
    with pytest.raises(UserError, match="--format 'tflite'"):
        export_model("tflite", bad / "m.tflite", checkpoint=runs["dense"])
    with pytest.raises(UserError, match="must end in .pte"):
        export_model("pte", bad / "m.onnx", checkpoint=runs["dense"])
    blocker = bad / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export_model("pte", blocker / "sub" / "m.pte", checkpoint=runs["dense"])
    with pytest.raises(UserError, match="--model 'no_such_model'"):
        export_model("onnx", bad / "m.onnx", model="no_such_model")
    assert only(bad) == ["file", "foreign.safetensors", "other.safetensors"]
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--format", "onnx"]) == 2


def test_failed_verification_leaves_nothing(runs, tmp_path, capsys):
    out = tmp_path / "m.pte"
    # int8 logits cannot match fp32 to 1e-6: the check must fail, and the artifact must not appear.
    with pytest.raises(VerificationError, match="max abs difference"):
        export_model(
            "pte", out, checkpoint=runs["dense"], quantize="int8", atol=1e-6, num_verify=8, verbose=False
        )
    assert only(tmp_path) == []
    # the CLI: one lowering checks both the message and that an older export does not stand in for the new one
    out.write_bytes(b"an older export")
    out.with_name(out.name + ".json").write_text("{}")
    code = main(
        ["export", "--checkpoint", str(runs["dense"]), "--format", "pte", "--quantize", "int8", "--out", str(out),
         "--num-verify", "8", "--atol", "1e-6"]
    )  # fmt: skip
    assert code == 1 and "verification failed, nothing written" in capsys.readouterr().err
    assert only(tmp_path) == []


def test_stale_temporaries_of_the_same_target_only(tmp_path):
    """What an export cleans first: its own target's and sidecar's temporaries, nothing else."""
    out = tmp_path / "m.pte"
    # ours: the artifact's and the sidecar's temporaries; theirs: another target's, and one whose name starts
    # like ours
    *stale, other, lookalike = killed_writers(
        (out, ".pte"), (tmp_path / "m.pte.json", ""), (tmp_path / "other.pte", ".pte"),
        (tmp_path / "m.pte.x.pte", ".pte"),
    )  # fmt: skip
    stale += killed_writers((tmp_path / stale[1].name, ""))  # the sidecar written at its temporary path
    stale.append(tmp_path / ".m.pte.ab_cd123.pte.tmp")
    stale[-1].mkdir()  # save_coreml stages a folder
    kept = [
        other,
        lookalike,
        tmp_path / ".m.pte.notes.tmp",  # not tempfile's 8 random characters
        tmp_path / "m.pte.tmp",
    ]
    for p in kept[2:]:
        p.write_text("keep")
    assert sorted(remove_stale_temporaries(out)) == sorted(stale)
    assert only(tmp_path) == sorted(p.name for p in kept)


def test_wrong_typed_model_kwarg_is_a_user_error(runs, tmp_path, capsys):
    net, meta = load_model(runs["moe"])
    bad = ModelMeta(
        meta.model, {**meta.model_kwargs, "num_experts": "ten"}, meta.class_names, meta.preprocess
    )
    path = save_model(tmp_path / "bad.safetensors", net, bad)
    out = tmp_path / "bad.onnx"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "model_kwargs" in err and "'ten'" in err
    assert only(tmp_path) == ["bad.safetensors"]


def test_quiet_unless_verbose(runs, tmp_path, caplog, capfd):
    """Library chatter (the ONNX optimiser logs every initializer it merges) stays out of an export's output
    unless the mobile_vmoe logger is at DEBUG (`mobile-vmoe -v`); the export's own steps are logged."""

    def chatter() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.split(".")[0] in ("onnx_ir", "onnxscript", "torch")]

    caplog.set_level(logging.INFO)
    export_model("onnx", tmp_path / "q.onnx", checkpoint=runs["dense"], num_verify=4, verbose=False)
    assert chatter() == [] and "Replaced initializer" not in "".join(capfd.readouterr())
    assert any(
        r.name.startswith("mobile_vmoe.export") and "verifying" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="mobile_vmoe")
    export_model("onnx", tmp_path / "v.onnx", checkpoint=runs["dense"], num_verify=4, verbose=False)
    assert chatter()


def test_int8_static_is_a_pte_scheme(runs, tmp_path):
    with pytest.raises(UserError, match="int8-static"):
        export_model("coreml", tmp_path / "m.mlpackage", checkpoint=runs["dense"], quantize="int8-static")
    with pytest.raises(UserError, match="expected one of"):
        export_model("pte", tmp_path / "m.pte", checkpoint=runs["dense"], quantize="int4")
    assert list(tmp_path.iterdir()) == []


def test_xnnpack_rewrite_keeps_the_maths():
    """export.rewrite.for_xnnpack: the same outputs (qk-norm included) from a copy; the source stays as it was."""
    import timm
    from mobile_vmoe.export.rewrite import BmmAttention, MatmulLayerNorm, for_xnnpack
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    model = timm.create_model(MOE, qk_norm=True, num_experts=3).eval()
    x = torch.randn(3, 3, 32, 32)
    copy, counts = for_xnnpack(model)
    n_blocks = len(model.blocks) + len(model.moe_blocks)
    # per block: norm1, norm2 and the q/k norms; then the final norm and the router's
    assert counts == {"attention": n_blocks, "layer_norm": 4 * n_blocks + 2, "router_pool": 1}
    assert copy.router.token_avg is not None and model.router.token_avg is None
    assert sum(isinstance(m, BmmAttention) for m in copy.modules()) == n_blocks
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in copy.modules())
    assert sum(isinstance(m, MatmulLayerNorm) for m in copy.modules()) == counts["layer_norm"]
    assert sum(type(m) is Attention for m in model.modules()) == n_blocks  # the source is untouched
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-5)
        with pytest.raises(ValueError, match="mask"):
            copy.blocks[0].attn(
                torch.randn(1, 5, model.embed_dim), attn_mask=torch.ones(5, 5, dtype=torch.bool)
            )


def test_int8_layer_choice_meets_its_target():
    """select_fp32_layers: nothing to return at a bar int8 already meets; at 100 % it returns linears until the
    simulated int8 model agrees everywhere; the simulation leaves the weights as they were."""
    import timm

    torch.manual_seed(0)
    # random weights: near-tied logits, int8 flips some; 4 blocks (2 dense, 2 MoE) flip as the default 12 do
    model = timm.create_model(MOE, num_experts=3, depth=4).eval()
    x = torch.randn(256, 3, 32, 32)  # 48 gave no flip at all
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert select_fp32_layers(model, x, 0.0)[0] == []
    fp32, rep = select_fp32_layers(model, x, 1.0)
    assert rep["simulated_agreement_all_int8"] < 1.0 and fp32 and rep["simulated_agreement"] == 1.0
    assert set(fp32) <= set(int8_candidates(model)) and len(set(fp32)) == len(fp32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad(), simulated_int8(model, int8_candidates(model)):
        w = model.blocks[0].attn.qkv.weight
        steps = w / (w.abs().amax(1, keepdim=True) / 127)  # int8 weights: integer multiples of their scale
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        mlp = model.moe_blocks[0].mlp  # a per-image MoE's experts: one scale per expert and output channel
        w = mlp.fc1_weight  # [E, D, H]
        steps = w / (w.abs().amax(1, keepdim=True) / 127)
        assert torch.allclose(steps, steps.round(), atol=1e-3) and isinstance(mlp.act, torch.nn.Sequential)
    assert not isinstance(model.moe_blocks[0].mlp.act, torch.nn.Sequential)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
