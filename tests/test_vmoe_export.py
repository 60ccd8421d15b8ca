"""Per-token V-MoE export: .pte, .onnx and .mlpackage, verified; the capacity ratio recorded in the sidecar."""

import pytest
import timm
import torch
from mobile_vmoe.export import export_model
from mobile_vmoe.export.pte import PteRunner, lower_pte
from mobile_vmoe.export.quantize import int8_candidates
from mobile_vmoe.export.token import buffer_rows, for_export

import mobile_vmoe.models  # noqa: F401  (registers the models)
from mobile_vmoe.checkpoint import ModelMeta, save_model
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.files.sidecar import read_sidecar
from mobile_vmoe.preprocess import Preprocess

TOKEN = "mobile_vmoe_token_nano_patch8_32"
KW = {"num_classes": 5, "num_experts": 4, "depth": 3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = timm.create_model(TOKEN, **KW).eval()
    d = tmp_path_factory.mktemp("vmoe_export")
    meta = ModelMeta(TOKEN, KW, [f"c{i}" for i in range(5)], Preprocess.for_model(m))
    return save_model(d / "model.safetensors", m, meta)


def test_export_form_is_the_same_maths():
    torch.manual_seed(0)
    m = timm.create_model(TOKEN, **KW).eval()
    x = torch.randn(3, 3, 32, 32)
    # the last: 3 images routed together, their class tokens first
    for ratio, bpr, cls_first, group in (
        (1.05, True, False, 1),
        (0.25, False, False, 1),
        (0.25, True, True, 3),
    ):
        m.set_routing(capacity_ratio=ratio, bpr=bpr, cls_first=cls_first, group_size=group)
        with torch.no_grad():
            torch.testing.assert_close(for_export(m)(x), m(x), atol=1e-5, rtol=1e-5)
    names = int8_candidates(for_export(m))
    assert names and not any("router" in n for n in names)  # the router stays fp32 under int8


def test_buffer_rows_put_each_expert_rows_together():
    # G=2 groups, E=2 experts, P=2 slots: slot e * P + p of group g -> row e * G * P + g * P + p; 4: dropped
    slot = torch.tensor([[[0], [2], [4]], [[1], [3], [0]]])
    expert = torch.tensor([[[0], [1], [0]], [[0], [1], [0]]])  # the dropped choice's expert does not matter
    assert buffer_rows(slot, expert, num_experts=2, capacity=2).tolist() == [0, 4, 8, 3, 7, 2]


def test_int8_pte_quantises_the_experts(tmp_path):
    """Dynamic int8 of a per-token MoE: its integer slot maths survives PT2E, and every expert linear is int8."""
    torch.manual_seed(0)
    m = for_export(timm.create_model(TOKEN, **KW).eval(), capacity_ratio=1.0)
    x = torch.randn(1, 3, 32, 32)
    buf, rep = lower_pte(m, x, "int8")
    n_int8 = rep["delegated_ops"]["quantized_decomposed_dequantize_per_channel_default"]
    assert n_int8 == len(int8_candidates(m)) == 4 * 1 + 2 * (2 + 2 * 4)  # 1 dense block, 2 MoE blocks, E=4
    (tmp_path / "m.pte").write_bytes(buf)
    xs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(xs)
    assert (PteRunner(tmp_path / "m.pte")(xs) - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("fmt, priority", [("pte", "vanilla"), ("onnx", "bpr_cls")])
def test_export_verifies_and_records_capacity(ckpt, tmp_path, fmt, priority):
    out = tmp_path / f"m.{fmt}"
    export_model(
        fmt, out, checkpoint=ckpt, capacity_ratio=0.5, priority=priority, num_verify=12, verbose=False
    )
    sc = read_sidecar(tmp_path / f"m.{fmt}.json")
    assert sc.routing["kind"] == "token" and sc.routing["capacity_ratio"] == 0.5
    assert sc.routing["priority"] == priority and sc.routing["E"] == 4 and sc.routing["L"] == 2
    p = sc.details["parity"]
    assert p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0 and sc.expert_dispatch is None
    if fmt == "pte":  # every expert linear runs in XNNPACK; routing and buffers on the portable kernels
        d = sc.details["delegation"]
        assert d["delegated_ops"].get("aten_linear_default", 0) >= 2 * 4 * 2
        assert "aten_addmm_default" not in d["portable_ops"] and "aten_bmm_default" not in d["portable_ops"]


def test_coreml_keeps_the_buffers(ckpt, tmp_path):
    out = tmp_path / "m.mlpackage"
    export_model("coreml", out, checkpoint=ckpt, num_verify=4, verbose=False)
    s = read_sidecar(tmp_path / "m.mlpackage.json").details["mil_structure"]
    assert s["buffers_preserved"] and s["extra_matmul_ops_over_dense"] == s["expected_extra"] == 2 * (
        1 + 2 * 3
    )


def test_capacity_options_need_a_per_token_model(tmp_path, capsys):
    with pytest.raises(UserError, match="--capacity-ratio must be > 0"):
        export_model("onnx", tmp_path / "m.onnx", model=TOKEN, capacity_ratio=0)
    code = main(["export", "--model", "mobile_vmoe_nano_patch8_32", "--format", "onnx", "--capacity-ratio", "0.5",
                 "--out", str(tmp_path / "x.onnx")])  # fmt: skip
    assert code == 2 and "per-token V-MoE" in capsys.readouterr().err
