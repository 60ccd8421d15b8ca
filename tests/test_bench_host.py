import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mobile_vmoe.bench as B
from mobile_vmoe import BENCH_CHILD_ENV
from mobile_vmoe.checkpoint import ModelMeta, load_model, save_model
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.files.sidecar import Sidecar, write_sidecar
from mobile_vmoe.preprocess import Preprocess

NAME = "mobile_vmoe_nano_patch4_32"
KW = {"depth": 2, "num_experts": 4, "num_classes": 6}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny MoE as checkpoint, .pte (XNNPACK) with a sidecar naming the checkpoint, and .onnx; 12 real images."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = timm.create_model(NAME, **KW).eval()
    with torch.no_grad():  # spread the router so that the images do not all pick one expert
        model.router.proj.weight.normal_(0, 2.0)
    ckpt = save_model(
        d / "model.safetensors",
        model,
        ModelMeta(NAME, KW, [f"c{i}" for i in range(6)], Preprocess.for_model(model)),
    )
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    pte = d / "model.pte"
    pte.write_bytes(
        to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    )
    sidecar = Sidecar(
        format="pte",
        artifact=pte.name,
        model=NAME,
        model_kwargs=KW,
        class_names=[f"c{i}" for i in range(6)],
        input_shape=[1, 3, 32, 32],
        preprocess=Preprocess.for_model(model),
        precision="fp32",
        routing={"E": 4, "K": 1, "L": 2},
        checkpoint=str(ckpt),
    )
    write_sidecar(pte, sidecar)
    onnx = d / "model.onnx"
    torch.onnx.export(model, (x,), str(onnx), dynamo=True)
    rng = np.random.default_rng(0)
    images = d / "images"
    for i in range(12):  # ImageFolder layout, two classes
        (images / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        arr[..., i % 3] = 255 * (i % 4 > 1)
        Image.fromarray(arr).save(images / f"class{i % 2}" / f"{i:02d}.png")
    return {"dir": d, "ckpt": ckpt, "pte": pte, "onnx": onnx, "images": images}


@pytest.fixture(scope="module")
def results(files):
    """Host results: .pte with real images (routing from the sidecar's checkpoint), .onnx through the CLI."""
    out = files["dir"] / "results"
    pte_doc = B.bench(
        files["pte"], warmup=2, iterations=12, images=files["images"], json_out=out / "pte.json"
    )
    rc = main(
        ["bench", str(files["onnx"]), "--warmup", "2", "--iterations", "6", "--threads", "1",
         "--json", str(out / "onnx.json")]
    )  # fmt: skip
    assert rc == 0
    return {"pte": out / "pte.json", "onnx": out / "onnx.json", "pte_doc": pte_doc}


def _experts_of(files):
    model, meta = load_model(files["ckpt"])
    imgs = B.load_images(B.list_images(files["images"]), Preprocess(size=32, resize=32))
    with torch.no_grad():
        _, routing = model.forward_with_routing(torch.from_numpy(np.concatenate(imgs)))
    return routing.expert_idx[:, 0].tolist()


def test_latency_stats_matches_numpy():
    s = B.latency_stats([4.0, 1.0, 3.0, 2.0, 10.0])
    assert s == {
        "count": 5, "p50": 3.0, "p90": pytest.approx(7.6), "p99": pytest.approx(9.76), "mean": 4.0,
        "std": pytest.approx(np.std([4, 1, 3, 2, 10])), "min": 1.0, "max": 10.0,
    }  # fmt: skip
    with pytest.raises(UserError):
        B.latency_stats([])


def test_host_pte_and_onnx_results_validate(results, files):
    for key, runtime in (("pte", "executorch"), ("onnx", "onnxruntime")):
        doc = json.loads(results[key].read_text())
        B.validate_result(doc, str(results[key]))
        assert doc["runtime"]["name"] == runtime
        assert doc["stats"] == B.latency_stats(doc["samples_ms"])
        assert len(doc["samples_ms"]) == doc["timed_iterations"]
        assert doc["cold_load_ms"] > 0 and doc["first_inference_ms"] > 0
        assert (
            doc["memory"]["kind"] == "VmHWM"
            and doc["memory"]["peak_bytes"] > doc["memory"]["delta_bytes"] > 0
        )
        assert doc["input"]["shape"] == [1, 3, 32, 32]
    pte = json.loads(results["pte"].read_text())
    assert pte["backend"]["delegates"] == ["XnnpackBackend"] and pte["backend"]["name"] == "xnnpack"
    assert set(pte["load_breakdown_ms"]) == {"load_program", "load_method"}
    assert pte["model"]["sidecar"]["checkpoint"] == str(files["ckpt"])
    assert pte["model"]["routing"] == {"E": 4, "K": 1, "L": 2} and pte["precision"] == "fp32"
    assert pte["input"]["source"] == "images" and pte["input"]["images"]["count"] == 12
    assert pte["input"]["preprocess"] == pte["model"]["sidecar"]["preprocess"]  # the sidecar's, as on phones
    onnx = json.loads(results["onnx"].read_text())
    assert onnx["backend"]["threads"] == 1 and onnx["model"]["sidecar"] is None
    assert onnx["latency_per_expert"] is None and any("no --images" in n for n in onnx["notes"])


def test_pte_latency_per_expert_follows_eager_routing(results, files):
    doc = results["pte_doc"]
    experts = _experts_of(files)
    assert len(set(experts)) > 1  # the fixture's router spreads the images
    per = doc["latency_per_expert"]
    assert {int(k): v["count"] for k, v in per.items()} == {e: experts.count(e) for e in set(experts)}
    for e, v in per.items():
        s = [t for t, x in zip(doc["samples_ms"], experts) if x == int(e)]
        assert v["p50"] == pytest.approx(float(np.median(s))) and v["mean"] == pytest.approx(
            float(np.mean(s))
        )


def test_eager_checkpoint_with_images(files, tmp_path):
    doc = B.bench(files["ckpt"], warmup=1, iterations=12, images=files["images"], isolate=False)
    B.validate_result(doc)
    assert doc["runtime"]["name"] == "torch" and doc["model"]["format"] == "safetensors"
    assert doc["model"]["name"] == NAME and doc["model"]["routing"] == {"E": 4, "K": 1, "L": 2}
    experts = _experts_of(files)
    assert sum(v["count"] for v in doc["latency_per_expert"].values()) == 12
    assert {int(k) for k in doc["latency_per_expert"]} == set(experts)
    assert any("calling process" in n for n in doc["notes"])


def test_bad_inputs_refused_before_work(files, tmp_path):
    with pytest.raises(UserError, match="not found"):
        B.bench(tmp_path / "missing.pte")
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported model file"):
        B.bench(bad)
    with pytest.raises(UserError, match="--iterations"):
        B.bench(files["onnx"], iterations=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        B.bench(files["onnx"], images=tmp_path / "empty")


def test_report_markdown_and_png(results, files, tmp_path):
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"top1": 0.5, "checkpoint": str(files["ckpt"]), "model": NAME}))
    out = tmp_path / "report"
    assert (
        main(
            [
                "bench",
                "report",
                str(results["pte"]),
                str(results["onnx"]),
                "--eval",
                str(ev),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    md = (out / "bench_report.md").read_text()
    main_table, experts_table = md.split("## Latency per routed expert")
    rows = [line for line in main_table.splitlines() if "| host (" in line]
    assert len(rows) == 2
    pte_doc = json.loads(results["pte"].read_text())
    assert any(
        "executorch" in r and "xnnpack" in r and f"{pte_doc['stats']['p50']:.3f}" in r and "50.00%" in r
        for r in rows
    )
    assert any(r.startswith("| model.onnx | onnxruntime") and "CPUExecutionProvider" in r for r in rows)
    per = json.loads(results["pte"].read_text())["latency_per_expert"]
    assert len([line for line in experts_table.splitlines() if line.startswith(f"| {NAME} |")]) == len(per)
    assert (out / "bench_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_file_and_schema_path(results, tmp_path, capsys):
    doc = json.loads(results["onnx"].read_text())
    doc["stats"]["p50"] = "fast"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"bad\.json.*\$\.stats\.p50"):
        B.report([results["pte"], bad], out_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert main(["bench", "report", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "$.stats.p50" in capsys.readouterr().err


def test_schema_rejects_bad_documents(results):
    good = json.loads(results["onnx"].read_text())
    for mutate, where in [
        (lambda d: d.update(schema_version="2.0"), r"\$\.schema_version"),
        (lambda d: d.pop("samples_ms"), "samples_ms"),
        (lambda d: d["runtime"].update(name="tflite"), r"\$\.runtime\.name"),
        (
            lambda d: d.update(latency_per_expert={"x": {"count": 1, "p50": 1.0, "mean": 1.0}}),
            "latency_per_expert",
        ),
        (lambda d: d.update(timed_iterations=d["timed_iterations"] + 1), "timed_iterations"),
    ]:
        d = json.loads(json.dumps(good))
        mutate(d)
        with pytest.raises(UserError, match=where):
            B.validate_result(d, "doc.json")


def test_ingest_recomputes_stats(results):
    doc = json.loads(results["onnx"].read_text())
    doc["stats"]["p50"] = 1e6  # what a buggy device harness might write
    doc["harness"]["name"] = "android_bench"
    out = B.ingest_result(doc)
    assert out["stats"] == B.latency_stats(doc["samples_ms"])
    assert any("recomputed" in n for n in out["notes"])


def test_phone_result_completed_on_host(results, files):
    """A result pulled from a phone that ran the staged images gets the host's grouping by routed expert."""
    from mobile_vmoe.bench.phones import PhoneRun, _complete
    from mobile_vmoe.files.sidecar import find_sidecar

    # what the Android harness writes, before the host adds to it
    pulled = json.loads(results["pte"].read_text())
    pulled.update(latency_per_expert=None, precision=None, notes=["latency_per_expert: null on the device"])
    pulled["model"].update(sidecar=None, routing=None, name=None)
    pulled["backend"].update(name="cpu", delegates=[])
    sidecar_path, sidecar = find_sidecar(files["pte"])
    run = PhoneRun(files["pte"], sidecar_path, sidecar, B.list_images(files["images"]), 2, 12, 60.0)
    doc = _complete(pulled, "android", run, files["images"], ["XnnpackBackend"])
    assert doc["latency_per_expert"] == results["pte_doc"]["latency_per_expert"]
    assert doc["model"]["routing"] == {"E": 4, "K": 1, "L": 2} and doc["model"]["name"] == NAME
    assert doc["backend"]["name"] == "xnnpack" and doc["precision"] == "fp32"
    assert doc["input"]["images"] == {"dir": str(files["images"]), "count": 12}
    assert not any(n.startswith("latency_per_expert") for n in doc["notes"])


def test_the_child_process_imports_neither_the_models_nor_timm_nor_torch():
    """What a bench child (``_run_child``'s environment) imports to open an .onnx: seconds saved per file."""
    code = (
        "import sys; from mobile_vmoe.bench.runtime import _child_main; "
        "print(sorted(m for m in ('mobile_vmoe.models', 'timm', 'torch') if m in sys.modules))"
    )
    env = {**os.environ, BENCH_CHILD_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_pte_child_opens_the_runtime_without_the_exporter_and_reads_the_backends(files, tmp_path):
    """A .pte child skips executorch's exporter (torch._dynamo, inductor: seconds per file), and its flatbuffer
    reader lists the backends that executorch's own deserialiser lists."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(files["pte"].read_bytes())
    prog = getattr(pte, "program", pte)
    assert sorted({d.id for plan in prog.execution_plan for d in plan.delegates}) == ["XnnpackBackend"]
    code = (
        "import sys; from mobile_vmoe.bench.runtime import _probe_pte; "
        f"p = _probe_pte({str(files['pte'])!r}); "
        "print(p.shape, p.delegates, [m for m in ('torch._dynamo', 'executorch.exir.program') if m in sys.modules], "
        "'executorch.exir' in sys.modules)"  # no bare package entry left behind
    )
    env = {**os.environ, BENCH_CHILD_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[1, 3, 32, 32] ['XnnpackBackend'] [] False"

    # what cannot be read lists no backend instead of failing the measurement
    from mobile_vmoe.bench.runtime import _delegates

    buf = files["pte"].read_bytes()
    for i, bad in enumerate([buf[:64], buf[:8] + b"\xff" * 56, b"not a program", b""]):
        (tmp_path / f"{i}.pte").write_bytes(bad)
        assert _delegates(str(tmp_path / f"{i}.pte")) == []
