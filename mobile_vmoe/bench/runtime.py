"""Everything that opens a model file with a runtime (ExecuTorch, ONNX Runtime, eager torch), run in a fresh
child process.

A ``.pte`` or ``.onnx`` is untrusted input: the ExecuTorch runtime aborts the whole process on some malformed
programs, so ``probe_model`` and ``measure`` open it in a child, where a crash becomes a UserError naming the file.
The child is also what makes peak memory meaningful: it is the child's peak resident set (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the model is loaded), so neither the parent's imports nor an earlier
run inflate it.

Child protocol: ``python -c "...; _child_main()" SPEC.json OUT.json``; the child writes ``{"ok": ...}`` or
``{"user_error": "..."}`` to OUT.json and progress lines (``PROGRESS_TAG done total``) to stdout.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import BENCH_CHILD_ENV
from ..common import UserError
from ..preprocess import Preprocess

__all__ = [
    "Measurement",
    "MeasureSpec",
    "ModelProbe",
    "host_device",
    "host_thermal",
    "measure",
    "probe_model",
]

log = logging.getLogger(__name__)

PROGRESS_TAG = "VMOE_BENCH_PROGRESS"
RUNTIME_NAMES = {"pte": "ExecuTorch program", "onnx": "ONNX model", "safetensors": "model file"}


class ModelProbe(NamedTuple):
    shape: list[int]  # of the first input, e.g. [1, 3, H, W]; dynamic ONNX dims read as 1
    delegates: list[str]  # ExecuTorch backends the program uses (e.g. XnnpackBackend); [] otherwise


@dataclass
class MeasureSpec:
    """What the child measures (JSON across the process boundary)."""

    format: str  # pte | onnx | safetensors
    path: str
    shape: list[int]
    warmup: int
    iterations: int
    threads: int | None = None
    images: list[str] = field(
        default_factory=list
    )  # iteration i runs on image i mod N; [] = one random input
    tokens: list[list[int]] = field(default_factory=list)  # a text encoder: iteration i on row i mod N
    preprocess: dict[str, Any] | None = None  # Preprocess.to_dict() for the images


@dataclass
class Measurement:
    runtime: dict[str, str]  # {"name", "version"}
    threads: int | None
    load_breakdown_ms: dict[str, float]
    cold_load_ms: float
    first_inference_ms: float
    samples_ms: list[float]
    memory: dict[str, Any]
    thermal_before: dict[str, Any] | None
    thermal_after: dict[str, Any] | None
    notes: list[str]
    delegates: list[str] = field(default_factory=list)  # as ModelProbe's, read by the measuring child


# ---------------------------------------------------------------------------------------------------------------
# Platform facts
# ---------------------------------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
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


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# In the child: probing and timing
# ---------------------------------------------------------------------------------------------------------------


def _executorch_runtime() -> tuple[Any, Any]:
    """(``executorch.runtime.Runtime``, ``portable_lib``); in a bench child, without importing the exporter.

    The bindings import one small module of ``executorch.exir`` (a warning class), and that package's
    ``__init__`` imports the whole exporter (torch._dynamo, inductor): seconds in every child. A child enters the
    package without running its ``__init__``, so that the module loads alone, and takes the bare entry out again
    (a later ``import executorch.exir`` runs the real one); should a later executorch need more of the package
    at import, the plain import runs instead. Elsewhere (``--in-process``) the plain import runs.
    """
    import importlib.util

    bare = None
    if os.environ.get(BENCH_CHILD_ENV) == "1" and "executorch.exir" not in sys.modules:
        bare = importlib.util.module_from_spec(importlib.util.find_spec("executorch.exir"))
        sys.modules["executorch.exir"] = bare
    try:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except (ImportError, AttributeError):
        if bare is None:
            raise
        for name in [m for m in sys.modules if m == "executorch.exir" or m.startswith("executorch.exir.")]:
            del sys.modules[name]
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    finally:
        if bare is not None and sys.modules.get("executorch.exir") is bare:
            del sys.modules["executorch.exir"]
    return Runtime, portable_lib


def _probe_pte(path: str) -> ModelProbe:
    Runtime, _ = _executorch_runtime()

    try:
        program = Runtime.get().load_program(path)
        shape = [int(s) for s in program.metadata("forward").input_tensor_meta(0).sizes()]
    except Exception as e:  # the runtime raises RuntimeError/ValueError with status codes
        raise UserError(
            f"{path}: not a loadable ExecuTorch program: no 'forward' method with a tensor input ({e})"
        ) from None
    return ModelProbe(shape, _delegates(path))


def _delegates(path: str) -> list[str]:
    """The ExecuTorch backends a ``.pte`` uses (informative; [] when they cannot be read).

    Read straight from the program's flatbuffer (ExecuTorch's ``program.fbs``: ``Program.execution_plan`` is
    field 1, ``ExecutionPlan.delegates`` field 7, ``BackendDelegate.id`` field 0): executorch's own reader
    sits behind the exporter's imports.
    """
    from flatbuffers import encode, packer
    from flatbuffers.table import Table

    def tables(t: Table, field: int) -> list[Table]:
        o = t.Offset(4 + 2 * field)
        if not o:
            return []
        start, n = t.Vector(o), t.VectorLen(o)
        if start + 4 * n > len(t.Bytes):  # a malformed length: no table list that long fits in the file
            raise ValueError("vector past the end of the file")
        return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(n)]

    try:
        buf = Path(path).read_bytes()
        if buf[4:6] != b"ET":  # the file identifier, ET<version>
            return []
        root = Table(buf, encode.Get(packer.uoffset, buf, 0))
        ids = {
            d.String(d.Pos + o).decode() for p in tables(root, 1) for d in tables(p, 7) if (o := d.Offset(4))
        }
        return sorted(ids)
    except Exception:
        return []


def _probe_onnx(path: str) -> ModelProbe:
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as e:
        raise UserError(f"{path}: not a loadable ONNX model ({e})") from None
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs or not inputs[0].type.HasField("tensor_type"):
        raise UserError(f"{path}: not a loadable ONNX model (its graph has no tensor input)")
    dims = inputs[0].type.tensor_type.shape.dim
    return ModelProbe([d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims], [])


class _Loaded(NamedTuple):
    run: Callable[[Any], Any]  # one inference on one prepared input
    inputs: list[Any]  # in the runtime's own type
    breakdown: dict[str, float]  # ms per load step
    runtime: dict[str, str]
    threads: int | None


def _ms(t0: int, t1: int) -> float:
    return (t1 - t0) / 1e6


class _MemoryMark:
    """Reset the peak RSS and read the RSS just before loading: the inputs and imports are not the model's."""

    def __init__(self) -> None:
        self.reset = _reset_peak_rss()
        self.before = _proc_status_bytes("VmRSS")

    def memory(self) -> dict[str, Any]:
        peak, kind = _peak_rss()
        ok = peak is not None and self.before is not None and self.reset
        return {
            "kind": kind,
            "peak_bytes": peak,
            "before_load_bytes": self.before,
            "delta_bytes": peak - self.before if ok else None,
        }


def _load_pte(path: str, arrays: list[np.ndarray], threads: int | None) -> tuple[_Loaded, _MemoryMark]:
    import torch

    Runtime, portable_lib = _executorch_runtime()
    runtime = Runtime.get()
    if threads:  # before any program is loaded: a reset under loaded XNNPACK programs hangs the next run
        portable_lib._unsafe_reset_threadpool(int(threads))
    xs = [torch.from_numpy(x) for x in arrays]
    mark = _MemoryMark()
    try:
        t0 = time.perf_counter_ns()
        program = runtime.load_program(path)
        t1 = time.perf_counter_ns()
        method = program.load_method("forward")
        t2 = time.perf_counter_ns()
    except Exception as e:
        raise UserError(f"{path}: not a loadable ExecuTorch program ({e})") from None
    loaded = _Loaded(
        run=lambda x: method.execute([x]),
        inputs=xs,
        breakdown={"load_program": _ms(t0, t1), "load_method": _ms(t1, t2)},
        runtime={"name": "executorch", "version": version_of("executorch")},
        threads=int(portable_lib._threadpool_get_thread_count()),
    )
    return loaded, mark


def _load_onnx(path: str, arrays: list[np.ndarray], threads: int | None) -> tuple[_Loaded, _MemoryMark]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    mark = _MemoryMark()
    try:
        t0 = time.perf_counter_ns()
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        t1 = time.perf_counter_ns()
    except Exception as e:
        raise UserError(f"{path}: not a loadable ONNX model ({e})") from None
    name = sess.get_inputs()[0].name
    loaded = _Loaded(
        run=lambda x: sess.run(None, {name: x}),
        inputs=arrays,
        breakdown={"create_session": _ms(t0, t1)},
        runtime={"name": "onnxruntime", "version": ort.__version__},
        threads=int(threads) if threads else os.cpu_count(),
    )
    return loaded, mark


def _load_torch(path: str, arrays: list[np.ndarray], threads: int | None) -> tuple[_Loaded, _MemoryMark]:
    import torch

    from .. import models  # noqa: F401  (registers them: the child skipped that at import)
    from ..checkpoint import load_model

    if threads:
        torch.set_num_threads(int(threads))
    xs = [torch.from_numpy(x) for x in arrays]
    mark = _MemoryMark()
    t0 = time.perf_counter_ns()
    model, _ = load_model(path)
    t1 = time.perf_counter_ns()

    def run(x: Any) -> Any:
        with torch.inference_mode():
            return model(x)

    loaded = _Loaded(
        run=run,
        inputs=xs,
        breakdown={"load_model": _ms(t0, t1)},
        runtime={"name": "torch", "version": torch.__version__},
        threads=torch.get_num_threads(),
    )
    return loaded, mark


_LOADERS = {"pte": _load_pte, "onnx": _load_onnx, "safetensors": _load_torch}


def _measure(spec: MeasureSpec, progress: Callable[[int, int], None] | None = None) -> Measurement:
    """Load the model, time the first inference, the warm-up and the timed runs; report memory and thermal state.

    Inputs (random or decoded images) are prepared before the peak-RSS reset, so they are not counted.
    """
    if spec.tokens:
        arrays = [np.asarray([row], dtype=np.int64) for row in spec.tokens]
    elif spec.images:
        from .host import load_images

        pre = Preprocess.from_dict(spec.preprocess, "bench spec: preprocess")
        arrays = load_images(spec.images, pre)
    else:
        arrays = [np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)]
    loaded, mark = _LOADERS[spec.format](spec.path, arrays, spec.threads)
    xs, run, n = loaded.inputs, loaded.run, len(loaded.inputs)
    t0 = time.perf_counter_ns()
    try:
        run(xs[0])
    except Exception as e:  # e.g. an input the program does not take
        raise UserError(
            f"{spec.path}: {loaded.runtime['name']} could not run the {RUNTIME_NAMES[spec.format]} on a "
            f"{list(np.shape(arrays[0]))} {arrays[0].dtype} input ({e})"
        ) from None
    first = _ms(t0, time.perf_counter_ns())
    thermal_before = host_thermal()
    total = spec.warmup + spec.iterations
    for j in range(spec.warmup):
        run(xs[j % n])
        if progress is not None:
            progress(j + 1, total)
    samples = []
    for i in range(spec.iterations):
        x = xs[i % n]
        t0 = time.perf_counter_ns()
        run(x)
        samples.append(_ms(t0, time.perf_counter_ns()))
        if progress is not None:  # outside the timed window
            progress(spec.warmup + i + 1, total)
    thermal_after = host_thermal()
    notes = (
        [] if mark.reset else ["could not reset the peak RSS before loading: peak_bytes includes the imports"]
    )
    return Measurement(
        runtime=loaded.runtime,
        threads=loaded.threads,
        load_breakdown_ms=loaded.breakdown,
        cold_load_ms=float(sum(loaded.breakdown.values())),
        first_inference_ms=first,
        samples_ms=samples,
        memory=mark.memory(),
        thermal_before=thermal_before,
        thermal_after=thermal_after,
        notes=notes,
        delegates=_delegates(spec.path) if spec.format == "pte" else [],
    )


def _child_progress() -> Callable[[int, int], None]:
    """Progress lines for the parent's bar, at most every 0.2 s and at the end."""
    last = [0.0]

    def emit(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or done == total:
            last[0] = now
            print(f"{PROGRESS_TAG} {done} {total}", flush=True)

    return emit


def _child_main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    task = json.loads(Path(spec_path).read_text())
    try:
        if task["task"] == "probe":
            probe = (_probe_pte if task["format"] == "pte" else _probe_onnx)(task["path"])
            result: dict[str, Any] = {"ok": probe._asdict()}
        else:
            m = _measure(MeasureSpec(**task["spec"]), _child_progress())
            result = {"ok": dataclasses.asdict(m)}
    except UserError as e:
        result = {"user_error": str(e)}
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# In the parent: the child process, progress
# ---------------------------------------------------------------------------------------------------------------


class Progress:
    """Runs done out of total: a tqdm bar on a terminal, else a plain log line every ~10 s and at the end."""

    def __init__(self, desc: str, total: int) -> None:
        from tqdm import tqdm

        self.desc, self.last = desc, time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit="run", disable=None, leave=False)

    def __call__(self, done: int, total: int) -> None:
        if not self.bar.disable:
            self.bar.update(done - self.bar.n)
        elif done == total or time.monotonic() - self.last >= 10.0:
            self.last = time.monotonic()
            log.info("%s: %d/%d runs", self.desc, done, total)

    def close(self) -> None:
        self.bar.close()


def _crash_message(path: str, fmt: str, task: str, returncode: int, stderr: str) -> str:
    try:
        sig = signal.Signals(-returncode).name
    except ValueError:
        sig = f"signal {-returncode}"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    detail = f": {last[:200]}" if last else ""
    if task == "probe":
        return (
            f"{path}: not a loadable {RUNTIME_NAMES[fmt]} (the runtime crashed with {sig} opening it{detail})"
        )
    return f"{path}: the runtime crashed with {sig} while loading or running the {RUNTIME_NAMES[fmt]}{detail}"


def _run_child(
    task: dict[str, Any], path: str, fmt: str, progress: Callable[[int, int], None] | None = None
) -> Any:
    """Run ``task`` on the model file ``path`` in a fresh Python; its UserError is re-raised here, and a crash
    becomes one naming the file."""
    with tempfile.TemporaryDirectory(prefix="vmoe-bench-") as tmp:
        spec_path, out_path, err_path = (Path(tmp) / n for n in ("spec.json", "out.json", "stderr.txt"))
        spec_path.write_text(json.dumps(task))
        code = "from mobile_vmoe.bench.runtime import _child_main; _child_main()"
        with open(err_path, "w") as err:  # a file, not a pipe: a chatty runtime cannot block the child
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(spec_path), str(out_path)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, BENCH_CHILD_ENV: "1"},
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                parts = line.split()
                if progress is not None and len(parts) == 3 and parts[0] == PROGRESS_TAG:
                    progress(int(parts[1]), int(parts[2]))
            returncode = proc.wait()
        stderr = err_path.read_text(errors="replace")
        if returncode < 0:
            raise UserError(_crash_message(path, fmt, task["task"], returncode, stderr))
        if returncode != 0 or not out_path.is_file():
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark child process failed (exit {returncode}) on {path}:\n{tail}")
        result = json.loads(out_path.read_text())
    if "user_error" in result:
        raise UserError(result["user_error"])
    return result["ok"]


def probe_model(path: str | os.PathLike[str], fmt: str) -> ModelProbe:
    """Input shape and delegates of a ``.pte`` / ``.onnx``, opened in a child process."""
    out = _run_child({"task": "probe", "format": fmt, "path": str(path)}, str(path), fmt)
    return ModelProbe([int(s) for s in out["shape"]], list(out["delegates"]))


def measure(spec: MeasureSpec, *, isolate: bool = True, desc: str = "bench") -> Measurement:
    """Time ``spec`` in a fresh child process (``isolate``) or in this one; a progress bar on a terminal."""
    progress = Progress(desc, spec.warmup + spec.iterations)
    try:
        if not isolate:
            return _measure(spec, progress)
        task = {"task": "measure", "spec": dataclasses.asdict(spec)}
        return Measurement(**_run_child(task, spec.path, spec.format, progress))
    finally:
        progress.close()
