"""Latency benchmarks with one result schema: host (ExecuTorch / ONNX Runtime / eager torch), iOS (Core ML,
``ios_bench/``) and Android (ExecuTorch, ``android_bench/``).

Every run produces one JSON document validated by ``mobile_vmoe/schemas/bench_result.schema.json``
(docs/BENCH_SCHEMA.md). ``latency_stats`` is the one function that turns samples into p50/p90/p99/mean/std/
min/max; host runs use it, and phone results are re-computed with it when they are pulled or reported.

Host runs measure in a fresh child process by default (``isolate=True``): peak memory is the child's peak resident
set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the model is loaded), so neither the
parent's imports nor an earlier run inflate it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import UserError, atomic_path, read_json, write_json_atomic, write_text_atomic
from .files.sidecar import Sidecar, find_sidecar
from .preprocess import Preprocess

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "bench_result.schema.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
IOS_DIR = REPO_ROOT / "ios_bench"
ANDROID_DIR = REPO_ROOT / "android_bench"

FORMATS = {".pte": "pte", ".onnx": "onnx", ".safetensors": "safetensors", ".mlpackage": "mlpackage"}
COMPUTE_UNITS = ("all", "cpuOnly", "cpuAndGPU", "cpuAndNeuralEngine")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# iOS / Android harness identifiers (must match ios_bench/ and android_bench/)
IOS_SCHEME = "VMoEBench-Package"
IOS_MODEL_STAGE = Path("Tests/VMoEBenchTests/Models")
IOS_RESULT_NAME = "vmoe_bench.json"
IOS_JSON_BEGIN, IOS_JSON_END = "VMOE_BENCH_JSON_BEGIN", "VMOE_BENCH_JSON_END"
ANDROID_PACKAGE = "org.mobilevmoe.bench"
ANDROID_ACTIVITY = "org.mobilevmoe.bench.BenchmarkActivity"
ANDROID_DEVICE_DIR = "/data/local/tmp/vmoe"
ANDROID_APK = Path("app/build/outputs/apk/debug/app-debug.apk")

__all__ = [
    "SCHEMA_VERSION",
    "android_commands",
    "bench",
    "ingest_result",
    "ios_commands",
    "latency_stats",
    "report",
    "validate_result",
]


# ---------------------------------------------------------------------------------------------------------------
# Statistics and schema (shared by host runs and phone results)
# ---------------------------------------------------------------------------------------------------------------


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """Per-iteration samples (ms) -> count, p50/p90/p99 (numpy linear interpolation), mean, std (ddof=0), min, max."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise UserError(
            f"latency samples must be a non-empty list of finite numbers, got {len(a.ravel())} values"
        )
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "count": int(a.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def expert_latency(samples_ms: Sequence[float], experts: Sequence[int]) -> dict[str, dict[str, float | int]]:
    """Group per-iteration samples by the routed expert of the image each iteration ran on."""
    if len(samples_ms) != len(experts):
        raise ValueError(f"{len(samples_ms)} samples but {len(experts)} expert indices")
    out: dict[str, dict[str, float | int]] = {}
    for e in sorted(set(int(e) for e in experts)):
        s = [t for t, x in zip(samples_ms, experts) if int(x) == e]
        st = latency_stats(s)
        out[str(e)] = {"count": st["count"], "p50": st["p50"], "mean": st["mean"]}
    return out


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def validate_result(doc: Any, source: str = "result") -> dict[str, Any]:
    """Check ``doc`` against the schema (and samples/count consistency); UserError names the file and the path."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if err is not None:
        raise UserError(
            f"{source}: not a valid bench result (schema {SCHEMA_VERSION}) at {err.json_path}: {err.message}"
        )
    if len(doc["samples_ms"]) != doc["timed_iterations"]:
        raise UserError(
            f"{source}: $.samples_ms has {len(doc['samples_ms'])} samples but $.timed_iterations is "
            f"{doc['timed_iterations']}"
        )
    return doc


def ingest_result(
    path_or_doc: str | os.PathLike[str] | dict[str, Any], source: str | None = None
) -> dict[str, Any]:
    """Read and validate a result (e.g. pulled from a phone), then recompute its stats with ``latency_stats``."""
    if isinstance(path_or_doc, dict):
        doc, source = path_or_doc, source or "result"
    else:
        source = source or str(path_or_doc)
        doc = read_json(path_or_doc, "bench result")
    validate_result(doc, source)
    recomputed = latency_stats(doc["samples_ms"])
    old = doc["stats"]
    if any(
        abs(float(old[k]) - float(recomputed[k])) > 1e-3 * max(1.0, abs(float(recomputed[k])))
        for k in recomputed
    ):
        doc["notes"] = [
            *doc["notes"],
            "stats recomputed on the host from samples_ms differ from the device's own",
        ]
    doc["stats"] = recomputed
    return doc


# ---------------------------------------------------------------------------------------------------------------
# Host measurement helpers (platform facts)
# ---------------------------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> tuple[int | None, str]:
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(r) if sys.platform == "darwin" else int(r) * 1024), "ru_maxrss"


def host_thermal() -> dict[str, Any] | None:
    """Linux thermal zones in degrees C (``/sys/class/thermal/*/temp``), or None where there are none."""
    zones: dict[str, float] = {}
    for temp in sorted(Path("/sys/class/thermal").glob("*/temp")):
        try:
            value = int(temp.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        try:
            kind = (temp.parent / "type").read_text().strip()
        except OSError:
            kind = ""
        zones[f"{temp.parent.name}:{kind}" if kind else temp.parent.name] = value
    return {"state": None, "zones_celsius": zones} if zones else None


def host_device() -> dict[str, Any]:
    chip = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                chip = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "model": f"host ({platform.machine()})",
        "os": platform.system(),
        "os_version": platform.release(),
        "chip": chip,
        "cpu_count": os.cpu_count(),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Model files, sidecars, inputs
# ---------------------------------------------------------------------------------------------------------------


def model_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported model file (expected one of {', '.join(FORMATS)})")
    return fmt


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    size = path.stat().st_size
    if path.suffix == ".onnx":  # external data written beside the graph
        size += sum(f.stat().st_size for f in path.parent.glob(path.name + ".data") if f.is_file())
    return size


def _routing_of(sidecar: Sidecar | None, model: Any = None) -> dict[str, int] | None:
    if model is not None and getattr(model, "is_moe", False):
        return {"E": int(model.num_experts), "K": int(model.top_k), "L": int(model.num_moe_layers)}
    r = sidecar.routing if sidecar is not None else None
    if isinstance(r, dict) and all(isinstance(r.get(k), int) for k in "EKL"):
        return {k: int(r[k]) for k in "EKL"}
    return None


def _sidecar_checkpoint(sidecar: Sidecar | None, sidecar_path: Path | None) -> Path | None:
    """The eager checkpoint the export came from, if the sidecar records one and it still exists."""
    if sidecar is None or sidecar.checkpoint is None:
        return None
    p = Path(sidecar.checkpoint)
    if not p.is_absolute() and sidecar_path is not None and not p.exists():
        p = sidecar_path.parent / p
    return p if p.exists() else None


def list_images(images: str | os.PathLike[str]) -> list[Path]:
    """An ImageFolder directory (any depth) or a flat directory of images, in sorted order."""
    d = Path(images)
    if not d.is_dir():
        raise UserError(f"--images: not a directory: {d}")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {d}")
    return files


def load_images(files: Sequence[str | os.PathLike[str]], pre: Preprocess) -> list[np.ndarray]:
    """Decode and preprocess as the model was evaluated; each array is [1, 3, size, size] float32."""
    from PIL import Image, UnidentifiedImageError

    tf = pre.transform()
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(tf(im).numpy()[None].astype(np.float32))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise UserError(f"{f}: not a readable image ({e})") from None
    return out


def _pte_info(path: Path) -> tuple[list[int], list[str]]:
    """Input shape of method "forward" and the delegates (backends) the program uses."""
    from executorch.runtime import Runtime

    try:
        program = Runtime.get().load_program(path)
        shape = list(program.metadata("forward").input_tensor_meta(0).sizes())
    except Exception as e:  # the runtime raises RuntimeError/ValueError with status codes
        raise UserError(
            f"{path}: ExecuTorch could not load the program or its 'forward' method ({e})"
        ) from None
    delegates: list[str] = []
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary

        pte = deserialize_pte_binary(path.read_bytes())
        prog = getattr(pte, "program", pte)
        delegates = sorted({d.id for plan in prog.execution_plan for d in plan.delegates})
    except Exception:  # private API: the delegate list is informative only
        pass
    return shape, delegates


def _onnx_shape(path: Path) -> list[int]:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX model ({e})") from None
    inits = {i.name for i in graph.initializer}
    inp = next(i for i in graph.input if i.name not in inits)
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        for d in inp.type.tensor_type.shape.dim
    ]


# ---------------------------------------------------------------------------------------------------------------
# The measurement (run in a fresh child process by default)
# ---------------------------------------------------------------------------------------------------------------


def _ms(t0: int, t1: int) -> float:
    return (t1 - t0) / 1e6


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, time first inference, warm-up and timed runs; report memory and thermal state.

    Inputs (random or decoded images) are prepared before the peak-RSS reset, so they are not counted.
    """
    fmt, path, threads = spec["format"], spec["path"], spec["threads"]
    shape = spec["shape"]
    if spec["images"]:
        inputs = load_images(spec["images"], Preprocess.from_dict(spec["preprocess"], "bench spec"))
    else:
        inputs = [np.random.default_rng(0).standard_normal(shape).astype(np.float32)]
    info: dict[str, Any] = {"notes": []}
    if fmt == "pte":
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        xs = [torch.from_numpy(x) for x in inputs]
        peak_reset = _reset_peak_rss()
        before = _proc_status_bytes("VmRSS")
        t0 = time.perf_counter_ns()
        program = runtime.load_program(path)
        t1 = time.perf_counter_ns()
        method = program.load_method("forward")
        t2 = time.perf_counter_ns()
        breakdown = {"load_program": _ms(t0, t1), "load_method": _ms(t1, t2)}

        def run(x: Any) -> Any:
            return method.execute([x])

        info["runtime"] = {"name": "executorch", "version": _version("executorch")}
        info["threads"] = int(portable_lib._threadpool_get_thread_count())
    elif fmt == "onnx":
        import onnxruntime as ort

        xs = inputs
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        peak_reset = _reset_peak_rss()
        before = _proc_status_bytes("VmRSS")
        t0 = time.perf_counter_ns()
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        t1 = time.perf_counter_ns()
        breakdown = {"create_session": _ms(t0, t1)}
        name = sess.get_inputs()[0].name

        def run(x: Any) -> Any:
            return sess.run(None, {name: x})

        info["runtime"] = {"name": "onnxruntime", "version": ort.__version__}
        info["threads"] = int(threads) if threads else os.cpu_count()
    else:
        import torch

        from .checkpoint import load_model

        if threads:
            torch.set_num_threads(int(threads))
        xs = [torch.from_numpy(x) for x in inputs]
        peak_reset = _reset_peak_rss()
        before = _proc_status_bytes("VmRSS")
        t0 = time.perf_counter_ns()
        model, _ = load_model(path)
        t1 = time.perf_counter_ns()
        breakdown = {"load_model": _ms(t0, t1)}

        def run(x: Any) -> Any:
            with torch.inference_mode():
                return model(x)

        info["runtime"] = {"name": "torch", "version": torch.__version__}
        info["threads"] = torch.get_num_threads()

    t0 = time.perf_counter_ns()
    run(xs[0])
    first = _ms(t0, time.perf_counter_ns())
    thermal_before = host_thermal()
    n = len(xs)
    for j in range(spec["warmup"]):
        run(xs[j % n])
    samples = []
    for i in range(spec["iterations"]):
        x = xs[i % n]
        t0 = time.perf_counter_ns()
        run(x)
        samples.append(_ms(t0, time.perf_counter_ns()))
    thermal_after = host_thermal()
    peak, kind = _peak_rss()
    if not peak_reset:
        info["notes"].append("could not reset the peak RSS before loading: peak_bytes includes the imports")
    info.update(
        load_breakdown_ms=breakdown,
        cold_load_ms=float(sum(breakdown.values())),
        first_inference_ms=first,
        samples_ms=samples,
        memory={
            "kind": kind,
            "peak_bytes": peak,
            "before_load_bytes": before,
            "delta_bytes": (peak - before)
            if (peak is not None and before is not None and peak_reset)
            else None,
        },
        thermal_before=thermal_before,
        thermal_after=thermal_after,
    )
    return info


def _child_main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = {"ok": _measure(spec)}
    except UserError as e:
        result = {"user_error": str(e)}
    Path(out_path).write_text(json.dumps(result))


def _measure_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmoe-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        code = "from mobile_vmoe.bench import _child_main; _child_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(spec_path), str(out_path)], capture_output=True, text=True
        )
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark child process failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
    if "user_error" in result:
        raise UserError(result["user_error"])
    return result["ok"]


# ---------------------------------------------------------------------------------------------------------------
# Host benchmark: the stage's entry function
# ---------------------------------------------------------------------------------------------------------------


def bench(
    model_file: str | os.PathLike[str],
    *,
    warmup: int = 10,
    iterations: int = 50,
    threads: int | None = None,
    images: str | os.PathLike[str] | None = None,
    json_out: str | os.PathLike[str] | None = None,
    isolate: bool = True,
) -> dict[str, Any]:
    """Benchmark FILE.pte (ExecuTorch), FILE.onnx (ONNX Runtime) or CKPT.safetensors (eager torch) on this host.

    Defaults: 10 warm-up and 50 timed runs (as ExecuTorch's Android benchmark app and TFLite's benchmark_model).
    With ``images``, iteration i runs on image i mod N, and for a MoE whose eager checkpoint is known (the input
    itself, or the sidecar's "checkpoint") the samples are grouped by the expert the router picks for each image.
    Returns the schema document; writes it atomically to ``json_out`` if given.
    """
    path = Path(model_file)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    fmt = model_format(path)
    if fmt == "mlpackage":
        raise UserError(
            f"{path}: Core ML packages run on Apple devices: use `mobile-vmoe bench --target ios`"
        )
    if warmup < 0 or iterations < 1:
        raise UserError(f"--warmup must be >= 0 and --iterations >= 1 (got {warmup}, {iterations})")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    notes: list[str] = []
    sidecar_path, sidecar = (None, None) if fmt == "safetensors" else find_sidecar(path)
    if fmt != "safetensors" and sidecar is None:
        notes.append(f"no export sidecar found beside {path.name} ({path.name}.json)")
    if sidecar is not None:
        sidecar.check_artifact(path, sidecar_path)
    image_files = list_images(images)[:iterations] if images is not None else []

    # Eager model: the input itself, or the checkpoint the export came from (for routing per image).
    eager, meta, ckpt = None, None, None
    if fmt == "safetensors":
        ckpt = path
    else:
        ckpt = _sidecar_checkpoint(sidecar, sidecar_path)
    if ckpt is not None and (fmt == "safetensors" or image_files):
        from .checkpoint import load_model

        eager, meta = load_model(ckpt)

    delegates: list[str] = []
    if fmt == "pte":
        shape, delegates = _pte_info(path)
    elif fmt == "onnx":
        shape = _onnx_shape(path)
    else:
        shape = [1, *eager.pretrained_cfg["input_size"]]
    # The preprocessing the model was evaluated with: the model file's, else the sidecar's copy of it.
    if meta is not None:
        pre = meta.preprocess
    elif sidecar is not None:
        pre = sidecar.preprocess
    else:
        pre = Preprocess(size=int(shape[-1]), resize=int(shape[-1]))

    spec = {
        "format": fmt,
        "path": str(path),
        "threads": threads,
        "shape": shape,
        "images": [str(f) for f in image_files],
        "preprocess": pre.to_dict(),
        "warmup": int(warmup),
        "iterations": int(iterations),
    }
    m = _measure_isolated(spec) if isolate else _measure(spec)
    notes.extend(m.pop("notes"))
    if not isolate:
        notes.append(
            "measured in the calling process: peak memory includes whatever that process held before"
        )

    # Latency per routed expert (MoE fed real images)
    per_expert = None
    if not image_files:
        notes.append("latency_per_expert: null (no --images given)")
    elif eager is None:
        notes.append(
            "latency_per_expert: null (no eager checkpoint to compute routing: the sidecar names none "
            "or it does not exist)"
        )
    elif not getattr(eager, "is_moe", False):
        notes.append("latency_per_expert: null (dense model)")
    else:
        experts = _route_images(eager, load_images(image_files, pre))
        per_image = [experts[i % len(experts)] for i in range(iterations)]
        per_expert = expert_latency(m["samples_ms"], per_image)

    samples = m["samples_ms"]
    precision = sidecar.precision if sidecar is not None else None
    if fmt == "safetensors":
        precision = "fp32"
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created_at": _now(),
        "harness": {
            "name": "mobile-vmoe-host",
            "version": _version("mobile-vmoe"),
            "isolated_process": isolate,
        },
        "device": host_device(),
        "runtime": m["runtime"],
        "backend": {
            "name": {
                "pte": "xnnpack" if "XnnpackBackend" in delegates else "portable",
                "onnx": "CPUExecutionProvider",
                "safetensors": "cpu",
            }[fmt],
            "compute_units": None,
            "threads": m["threads"],
            "delegates": delegates,
            "compute_plan": None,
        },
        "model": {
            "path": str(path),
            "format": fmt,
            "size_bytes": _size_bytes(path),
            "name": (meta.model if meta is not None else None) or (sidecar.model if sidecar else None),
            "sidecar": sidecar.to_dict() if sidecar is not None else None,
            "routing": _routing_of(sidecar, eager),
        },
        "precision": precision,
        "input": {
            "shape": [int(s) for s in shape],
            "dtype": "float32",
            "source": "images" if image_files else "random",
            "images": {"dir": str(images), "count": len(image_files)} if image_files else None,
        },
        "warmup_iterations": int(warmup),
        "timed_iterations": int(iterations),
        "cold_load_ms": m["cold_load_ms"],
        "load_breakdown_ms": m["load_breakdown_ms"],
        "first_inference_ms": m["first_inference_ms"],
        "samples_ms": samples,
        "stats": latency_stats(samples),
        "memory": m["memory"],
        "thermal_before": m["thermal_before"],
        "thermal_after": m["thermal_after"],
        "latency_per_expert": per_expert,
        "notes": notes,
    }
    validate_result(doc, "host result")
    if json_out is not None:
        write_json_atomic(json_out, doc)
    return doc


def _route_images(model: Any, images: Sequence[np.ndarray]) -> list[int]:
    """The first routed expert (expert_idx[:, 0]) of each image, from the eager model."""
    import torch

    out: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(np.concatenate(images[i : i + 64]))
            _, routing = model.forward_with_routing(x)
            out.extend(int(e) for e in routing.expert_idx[:, 0])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Device drivers: command construction (pure) and running
# ---------------------------------------------------------------------------------------------------------------


def ios_commands(
    model: str | os.PathLike[str],
    *,
    device: str | None,
    compute_units: str = "all",
    warmup: int = 10,
    iterations: int = 50,
    project_dir: str | os.PathLike[str] = IOS_DIR,
    result_path: str | os.PathLike[str] = "vmoe_bench.json",
    bundle_id: str | None = None,
    derived_data: str | os.PathLike[str] | None = None,
) -> dict[str, list[str]]:
    """argv lists for an iOS device run (xcodebuild test, run in ``project_dir``; devicectl copy) or, with device
    None/"mac", swift run.

    The model is staged into the test bundle (``IOS_MODEL_STAGE``) and named to the test through
    TEST_RUNNER_ variables, which xcodebuild passes to the test process with the prefix removed.
    """
    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    project_dir = Path(project_dir)
    name = Path(model).name
    if device in (None, "mac"):
        return {
            "run": [
                "swift",
                "run",
                "--package-path",
                str(project_dir),
                "-c",
                "release",
                "vmoe-bench",
                "--model",
                str(Path(model).resolve()),
                "--compute-units",
                compute_units,
                "--warmup",
                str(warmup),
                "--iterations",
                str(iterations),
                "--output",
                str(result_path),
            ],
        }
    cmds = {
        "test": [
            "env",
            f"TEST_RUNNER_VMOE_MODEL={name}",
            f"TEST_RUNNER_VMOE_COMPUTE_UNITS={compute_units}",
            f"TEST_RUNNER_VMOE_WARMUP={warmup}",
            f"TEST_RUNNER_VMOE_ITERATIONS={iterations}",
            f"TEST_RUNNER_VMOE_RESULT_NAME={IOS_RESULT_NAME}",
            "xcodebuild",
            "test",
            "-scheme",
            IOS_SCHEME,
            "-destination",
            f"platform=iOS,id={device}",
            "-only-testing:VMoEBenchTests/VMoEBenchTests/testBenchmark",
        ],
    }
    if derived_data is not None:
        cmds["test"] += ["-derivedDataPath", str(derived_data)]
    if bundle_id:
        cmds["pull"] = [
            "xcrun",
            "devicectl",
            "device",
            "copy",
            "from",
            "--device",
            device,
            "--domain-type",
            "appDataContainer",
            "--domain-identifier",
            bundle_id,
            "--source",
            f"Documents/{IOS_RESULT_NAME}",
            "--destination",
            str(result_path),
        ]
    return cmds


def android_commands(
    model: str | os.PathLike[str],
    *,
    serial: str | None = None,
    warmup: int = 10,
    iterations: int = 50,
    threads: int | None = None,
    shape: Sequence[int] | None = None,
    project_dir: str | os.PathLike[str] = ANDROID_DIR,
    apk: str | os.PathLike[str] | None = None,
    result_name: str = "vmoe_bench.json",
    gradle: str = "gradle",
) -> dict[str, list[str]]:
    """argv lists for an Android run: build, install, push, clear, start, poll, pull."""
    adb = ["adb", *(["-s", serial] if serial else [])]
    project_dir = Path(project_dir)
    remote = f"{ANDROID_DEVICE_DIR}/{Path(model).name}"
    apk_path = Path(apk) if apk else project_dir / ANDROID_APK
    start = [
        *adb,
        "shell",
        "am",
        "start",
        "-W",
        "-S",
        "-n",
        f"{ANDROID_PACKAGE}/{ANDROID_ACTIVITY}",
        "--es",
        "model",
        remote,
        "--ei",
        "warmup",
        str(warmup),
        "--ei",
        "iterations",
        str(iterations),
        "--es",
        "out",
        result_name,
    ]
    if threads:
        start += ["--ei", "threads", str(threads)]
    if shape:
        start += ["--es", "shape", ",".join(str(int(s)) for s in shape)]
    cmds = {
        "mkdir": [*adb, "shell", "mkdir", "-p", ANDROID_DEVICE_DIR],
        "push": [*adb, "push", str(model), remote],
        "install": [*adb, "install", "-r", "-t", str(apk_path)],
        "clear": [
            *adb,
            "shell",
            "run-as",
            ANDROID_PACKAGE,
            "rm",
            "-f",
            f"files/{result_name}",
            f"files/{result_name}.error.txt",
        ],
        "start": start,
        "poll": [*adb, "shell", "run-as", ANDROID_PACKAGE, "ls", "files"],
        "pull": [*adb, "exec-out", "run-as", ANDROID_PACKAGE, "cat", f"files/{result_name}"],
        "error": [*adb, "exec-out", "run-as", ANDROID_PACKAGE, "cat", f"files/{result_name}.error.txt"],
    }
    if apk is None:
        cmds["build"] = [gradle, "-p", str(project_dir), ":app:assembleDebug"]
    return cmds


IOS_MISSING = (
    "{tool} not found on PATH: iOS runs need a Mac with Xcode 15.3+ (App Store), its command-line "
    "tools (`xcode-select --install`) and a device paired in Xcode; see ios_bench/README.md"
)
ANDROID_MISSING = {
    "adb": 'adb not found on PATH: install Android SDK Platform-Tools (sdkmanager "platform-tools", or '
    "`apt-get install adb`) and put it on PATH; see android_bench/README.md",
    "gradle": "gradle not found on PATH: install Gradle 8.7+ (or Android Studio) and set ANDROID_HOME to the SDK, "
    "or build the app elsewhere and pass --apk app-debug.apk; see android_bench/README.md",
}


def _require(tools: Sequence[str], messages: dict[str, str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise UserError("; ".join(messages[t] for t in missing))


def _run(
    argv: list[str], what: str, timeout: float | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-20:])
        raise UserError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    return proc


def _json_between_markers(text: str) -> dict[str, Any] | None:
    i, j = text.rfind(IOS_JSON_BEGIN), text.rfind(IOS_JSON_END)
    if i < 0 or j < i:
        return None
    try:
        return json.loads(text[i + len(IOS_JSON_BEGIN) : j])
    except json.JSONDecodeError:
        return None


def bench_device(
    target: str,
    model_file: str | os.PathLike[str],
    *,
    json_out: str | os.PathLike[str],
    warmup: int = 10,
    iterations: int = 50,
    threads: int | None = None,
    device: str | None = None,
    compute_units: str = "all",
    apk: str | os.PathLike[str] | None = None,
    bundle_id: str | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Build, deploy, run and pull on an iOS or Android device; validate and recompute the pulled result."""
    path = Path(model_file)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    fmt = model_format(path)
    want = {"ios": "mlpackage", "android": "pte"}[target]
    if fmt != want:
        raise UserError(f"{path}: --target {target} runs .{want} files, got .{fmt}")
    if warmup < 0 or iterations < 1:
        raise UserError(f"--warmup must be >= 0 and --iterations >= 1 (got {warmup}, {iterations})")
    sidecar_path, sidecar = find_sidecar(path)
    if sidecar is not None:
        sidecar.check_artifact(path, sidecar_path)
    if target == "ios":
        doc = _run_ios(path, device, compute_units, warmup, iterations, bundle_id, timeout)
    else:
        doc = _run_android(path, device, warmup, iterations, threads, apk, timeout)
    doc = ingest_result(doc, source=f"result pulled from the {target} device")
    doc["model"]["sidecar"] = doc["model"].get("sidecar") or (sidecar.to_dict() if sidecar else None)
    doc["model"]["routing"] = doc["model"].get("routing") or _routing_of(sidecar)
    doc["model"]["name"] = doc["model"].get("name") or (sidecar.model if sidecar else None)
    if target == "android" and not doc["backend"].get(
        "delegates"
    ):  # the phone cannot list them; the host can
        delegates = _pte_info(path)[1]
        doc["backend"]["delegates"] = delegates
        doc["backend"]["name"] = "xnnpack" if "XnnpackBackend" in delegates else doc["backend"]["name"]
    if doc.get("precision") is None and sidecar:
        doc["precision"] = sidecar.precision
    validate_result(doc, f"result pulled from the {target} device")
    write_json_atomic(json_out, doc)
    return doc


def _run_ios(
    path: Path,
    device: str | None,
    compute_units: str,
    warmup: int,
    iterations: int,
    bundle_id: str | None,
    timeout: float,
) -> dict[str, Any]:
    on_mac = device in (None, "mac")
    if on_mac:
        if platform.system() != "Darwin":
            raise UserError(
                "--target ios without --device runs the Swift command-line harness and needs macOS; "
                "pass --device <UDID> (from `xcrun devicectl list devices`) on a Mac with Xcode"
            )
        _require(["swift"], {"swift": IOS_MISSING.format(tool="swift")})
    else:
        _require(["xcodebuild", "xcrun"], {t: IOS_MISSING.format(tool=t) for t in ("xcodebuild", "xcrun")})
    with tempfile.TemporaryDirectory(prefix="vmoe-ios-") as tmp:
        result = Path(tmp) / IOS_RESULT_NAME
        cmds = ios_commands(
            path,
            device=device,
            compute_units=compute_units,
            warmup=warmup,
            iterations=iterations,
            result_path=result,
            bundle_id=bundle_id,
            derived_data=Path(tmp) / "DerivedData",
        )
        if on_mac:
            _run(cmds["run"], "swift run", timeout)
            return read_json(result, "iOS bench result")
        if not (IOS_DIR / "Package.swift").is_file():
            raise UserError(f"iOS harness not found at {IOS_DIR} (run from a source checkout of mobile-vmoe)")
        stage = IOS_DIR / IOS_MODEL_STAGE / path.name  # bundled as a test resource
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(path, stage)
        try:
            proc = _run(cmds["test"], "xcodebuild test", timeout, cwd=IOS_DIR)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if "pull" in cmds:
            _run(cmds["pull"], "xcrun devicectl device copy from", 300)
            return read_json(result, "iOS bench result")
        doc = _json_between_markers(proc.stdout + proc.stderr)
        if doc is None:
            raise UserError(
                "xcodebuild test finished but printed no result between "
                f"{IOS_JSON_BEGIN}/{IOS_JSON_END}; pass --bundle-id of the test runner to pull "
                f"Documents/{IOS_RESULT_NAME} with devicectl instead"
            )
        return doc


def _run_android(
    path: Path,
    serial: str | None,
    warmup: int,
    iterations: int,
    threads: int | None,
    apk: str | os.PathLike[str] | None,
    timeout: float,
) -> dict[str, Any]:
    tools = ["adb"] + ([] if apk else ["gradle"])
    _require(tools, ANDROID_MISSING)
    if apk is not None and not Path(apk).is_file():
        raise UserError(f"--apk: file not found: {apk}")
    shape, _ = _pte_info(path)
    cmds = android_commands(
        path, serial=serial, warmup=warmup, iterations=iterations, threads=threads, shape=shape, apk=apk
    )
    if "build" in cmds:
        _run(cmds["build"], "gradle build of android_bench", timeout)
    for step in ("install", "mkdir", "push"):
        _run(cmds[step], f"adb {step}", 600)
    subprocess.run(cmds["clear"], capture_output=True, text=True)  # no app data yet on a fresh install
    _run(cmds["start"], "adb shell am start", 120)
    name = cmds["pull"][-1].split("/")[-1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(cmds["poll"], capture_output=True, text=True).stdout.split()
        if name + ".error.txt" in listing:
            err = subprocess.run(cmds["error"], capture_output=True, text=True).stdout.strip()
            raise UserError(f"the Android benchmark failed on the device: {err}")
        if name in listing:
            out = _run(cmds["pull"], "adb exec-out run-as cat", 120).stdout
            try:
                return json.loads(out)
            except json.JSONDecodeError as e:
                raise UserError(f"result pulled from the Android device is not JSON ({e})") from None
        time.sleep(2.0)
    raise UserError(
        f"no result from the Android device after {timeout:.0f} s (see `adb logcat -s VMoEBench`)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Report: Markdown table + PNG plot
# ---------------------------------------------------------------------------------------------------------------


def _label(doc: dict[str, Any]) -> str:
    model = doc["model"]["name"] or Path(doc["model"]["path"]).name
    backend = doc["backend"]["name"] + (
        f"/{doc['backend']['compute_units']}" if doc["backend"]["compute_units"] else ""
    )
    return f"{model}\n{doc['runtime']['name']} {backend}\n{doc['device']['model']}"


def _eval_keys(ev: dict[str, Any]) -> tuple[set[str], set[str]]:
    paths = {str(Path(ev[k]).resolve()) for k in ("checkpoint",) if isinstance(ev.get(k), str)}
    names = {ev[k] for k in ("model",) if isinstance(ev.get(k), str)}
    return paths, names


def _result_keys(doc: dict[str, Any]) -> tuple[set[str], set[str]]:
    paths = set()
    if doc["model"]["format"] == "safetensors":
        paths.add(str(Path(doc["model"]["path"]).resolve()))
    sc = doc["model"].get("sidecar") or {}
    if isinstance(sc.get("checkpoint"), str):
        paths.add(str(Path(sc["checkpoint"]).resolve()))
    names = {n for n in (doc["model"].get("name"), sc.get("model")) if isinstance(n, str)}
    return paths, names


def _match_eval(doc: dict[str, Any], evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    rp, rn = _result_keys(doc)
    by_path = [e for e in evals if _eval_keys(e)[0] & rp]
    if by_path:
        return by_path[0]
    by_name = [e for e in evals if _eval_keys(e)[1] & rn]
    return by_name[0] if len(by_name) == 1 else None


def _fmt_thermal(t: dict[str, Any] | None) -> str:
    if t is None:
        return "n/a"
    if t.get("state"):
        return str(t["state"])
    zones = t.get("zones_celsius") or {}
    return f"{max(zones.values()):.0f}°C" if zones else "n/a"


def report(
    results: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str],
    evals: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Path]:
    """RESULTS.json... (+ optional evaluation JSONs with "top1") -> OUT/bench_report.md and OUT/bench_latency.png."""
    if not results:
        raise UserError("bench report: give at least one RESULTS.json")
    docs = [ingest_result(r) for r in results]  # validates every file before any plotting
    ev_docs = []
    for e in evals:
        ev = read_json(e, "evaluation result")
        if not isinstance(ev, dict) or not isinstance(ev.get("top1"), (int, float)):
            raise UserError(f'{e}: evaluation JSON must be an object with a numeric "top1"')
        if not isinstance(ev.get("checkpoint"), str) and not isinstance(ev.get("model"), str):
            raise UserError(f'{e}: evaluation JSON needs a "checkpoint" or "model" field to match results')
        ev_docs.append(ev)
    matched = [_match_eval(d, ev_docs) for d in docs]

    header = (
        "| model | runtime | backend | device | precision | threads | n | p50 ms | p90 ms | p99 ms | mean ms "
        "| std ms | cold load ms | first ms | peak MB (+load) | thermal before → after | top-1 |"
    )
    rows = [header, "|" + "---|" * 4 + "---|" + "---:|" * 12]
    for d, ev in zip(docs, matched):
        s, mem = d["stats"], d["memory"]
        backend = d["backend"]["name"] + (
            f" ({d['backend']['compute_units']})" if d["backend"]["compute_units"] else ""
        )
        peak = f"{mem['peak_bytes'] / 2**20:.0f}" if mem.get("peak_bytes") is not None else "n/a"
        if mem.get("delta_bytes") is not None:  # the model's share of the process peak
            peak += f" (+{mem['delta_bytes'] / 2**20:.1f})"
        top1 = (
            f"{100 * ev['top1']:.2f}%"
            if ev is not None and ev["top1"] <= 1
            else (f"{ev['top1']:.2f}%" if ev is not None else "")
        )
        rows.append(
            f"| {d['model']['name'] or Path(d['model']['path']).name} | {d['runtime']['name']} "
            f"{d['runtime']['version']} | {backend} | {d['device']['model']} | {d['precision'] or 'n/a'} | "
            f"{d['backend']['threads'] or 'n/a'} | {s['count']} | {s['p50']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | "
            f"{s['mean']:.3f} | {s['std']:.3f} | {d['cold_load_ms']:.1f} | {d['first_inference_ms']:.2f} | {peak} | "
            f"{_fmt_thermal(d['thermal_before'])} → {_fmt_thermal(d['thermal_after'])} | {top1} |"
        )
    experts = [(d, d["latency_per_expert"]) for d in docs if d["latency_per_expert"]]
    md = [
        "# Latency report",
        "",
        f"{len(docs)} result(s); samples in ms, p50/p90/p99 over timed runs.",
        "",
        *rows,
    ]
    if experts:
        md += [
            "",
            "## Latency per routed expert",
            "",
            "| model | runtime | backend | device | expert | count | p50 ms | mean ms |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for d, pe in experts:
            for e, v in sorted(pe.items(), key=lambda kv: int(kv[0])):
                md.append(
                    f"| {d['model']['name'] or Path(d['model']['path']).name} | {d['runtime']['name']} | "
                    f"{d['backend']['name']} | {d['device']['model']} | {e} | {v['count']} | "
                    f"{v['p50']:.3f} | {v['mean']:.3f} |"
                )
    md += ["", "![latency](bench_latency.png)", ""]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_acc = any(ev is not None for ev in matched)
    fig, axes = plt.subplots(
        1, 2 if have_acc else 1, figsize=(max(6, 2.8 * len(docs)) + (5 if have_acc else 0), 5), squeeze=False
    )
    ax = axes[0, 0]
    ax.boxplot([d["samples_ms"] for d in docs], showfliers=True)
    ax.set_xticks(range(1, len(docs) + 1), [_label(d) for d in docs], fontsize=7, rotation=15, ha="right")
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title("latency distribution (timed runs)")
    if have_acc:
        ax2 = axes[0, 1]
        for d, ev in zip(docs, matched):
            if ev is None:
                continue
            ax2.scatter(d["stats"]["p50"], ev["top1"])
            ax2.annotate(
                f"{d['model']['name'] or Path(d['model']['path']).name} ({d['runtime']['name']})",
                (d["stats"]["p50"], ev["top1"]),
                fontsize=7,
            )
        ax2.set_xlabel("p50 latency (ms)")
        ax2.set_ylabel("top-1")
        ax2.set_title("accuracy against latency")
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, md_path = out / "bench_latency.png", out / "bench_report.md"
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    write_text_atomic(md_path, "\n".join(md))
    return {"markdown": md_path, "png": png}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    if args.inputs[0] == "report":
        if args.out is None:
            raise UserError("bench report: --out DIR is required")
        paths = report(args.inputs[1:], out_dir=args.out, evals=args.eval or ())
        print(f"wrote {paths['markdown']} and {paths['png']}")
        return 0
    if len(args.inputs) != 1:
        raise UserError(
            f"bench: give one model file (got {len(args.inputs)}); to compare results use "
            "`mobile-vmoe bench report RESULTS.json... --out DIR`"
        )
    if args.eval:
        raise UserError("--eval is for `mobile-vmoe bench report`")
    if args.target == "host":
        doc = bench(
            args.inputs[0],
            warmup=args.warmup,
            iterations=args.iterations,
            threads=args.threads,
            images=args.images,
            json_out=args.json,
            isolate=not args.in_process,
        )
    else:
        if args.json is None:
            raise UserError(f"--target {args.target}: --json OUT is required (where the pulled result goes)")
        doc = bench_device(
            args.target,
            args.inputs[0],
            json_out=args.json,
            warmup=args.warmup,
            iterations=args.iterations,
            threads=args.threads,
            device=args.device,
            compute_units=args.compute_units,
            apk=args.apk,
            bundle_id=args.bundle_id,
        )
    s = doc["stats"]
    print(
        f"{doc['model']['name'] or doc['model']['path']} on {doc['runtime']['name']} {doc['backend']['name']}: "
        f"p50 {s['p50']:.3f} ms, p90 {s['p90']:.3f} ms, mean {s['mean']:.3f} ± {s['std']:.3f} ms "
        f"(n={s['count']}), cold load {doc['cold_load_ms']:.1f} ms, first {doc['first_inference_ms']:.2f} ms"
    )
    if args.json:
        print(f"wrote {args.json}")
    else:
        print(json.dumps(doc, indent=2))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="latency benchmark (host, iOS, Android) with one JSON result schema; `bench report` compares results",
        description="mobile-vmoe bench FILE.pte|FILE.onnx|CKPT.safetensors [options] --json OUT\n"
        "mobile-vmoe bench --target ios|android MODEL [options] --json OUT\n"
        "mobile-vmoe bench report RESULTS.json... [--eval EVAL.json ...] --out DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="FILE", help="a model file, or the word `report` then RESULTS.json..."
    )
    p.add_argument("--target", choices=("host", "ios", "android"), default="host")
    p.add_argument(
        "--warmup", type=int, default=10, help="warm-up runs after the first inference (default 10)"
    )
    p.add_argument("--iterations", type=int, default=50, help="timed runs (default 50)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (runtime default if omitted)")
    p.add_argument(
        "--images", default=None, help="directory of images (ImageFolder or flat): one per timed run"
    )
    p.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="host: measure in this process instead of a fresh child (peak memory less meaningful)",
    )
    p.add_argument(
        "--device", default=None, help="ios: device UDID (omit on a Mac to run there); android: serial"
    )
    p.add_argument("--compute-units", choices=COMPUTE_UNITS, default="all", help="ios: MLComputeUnits")
    p.add_argument(
        "--bundle-id", default=None, help="ios: test runner bundle id, to pull the JSON with devicectl"
    )
    p.add_argument("--apk", default=None, help="android: a prebuilt app-debug.apk (skips the gradle build)")
    p.add_argument(
        "--eval", action="append", default=None, metavar="EVAL.json", help="report: evaluation results"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="report: output directory")
    p.set_defaults(func=_cli)
