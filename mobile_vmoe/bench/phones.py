"""`mobile-vmoe bench --target ios|android`: build, deploy, run and pull on a phone; the pulled result is
validated and completed on the host.

What travels with the model: its export sidecar (``FILE.<ext>.json``: the harnesses read ``preprocess`` from it)
and, with ``--images``, the host's first ``iterations`` images in the host's order, renamed ``00000.<ext>``, ...
and listed in ``index.txt``. So iteration i runs on image i mod N on the phone as on the host, preprocessed the
same way (resize the shorter side, centre crop, normalise), and the host groups the pulled samples by the expert
its eager router picks for each image.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common import UserError, read_json, store_paths, write_json_atomic
from ..files.sidecar import Sidecar
from .host import (
    check_counts,
    check_image_input,
    checked_sidecar,
    list_images,
    model_format,
    per_expert_latency,
    routing_of,
    sidecar_checkpoint,
)
from .runtime import probe_model
from .schema import RESULT_PATHS, ingest_result, validate_result

__all__ = ["android_commands", "bench_device", "ios_commands", "stage_images"]

REPO_ROOT = Path(__file__).resolve().parents[2]
IOS_DIR = REPO_ROOT / "ios_bench"
ANDROID_DIR = REPO_ROOT / "android_bench"
COMPUTE_UNITS = ("all", "cpuOnly", "cpuAndGPU", "cpuAndNeuralEngine")

# iOS / Android harness identifiers (must match ios_bench/ and android_bench/)
IOS_SCHEME = "VMoEBench-Package"
IOS_MODEL_STAGE = Path("Tests/VMoEBenchTests/Models")
IOS_RESULT_NAME = "vmoe_bench.json"
IOS_JSON_BEGIN, IOS_JSON_END = "VMOE_BENCH_JSON_BEGIN", "VMOE_BENCH_JSON_END"
ANDROID_PACKAGE = "org.mobilevmoe.bench"
ANDROID_ACTIVITY = "org.mobilevmoe.bench.BenchmarkActivity"
ANDROID_DEVICE_DIR = "/data/local/tmp/vmoe"
ANDROID_APK = Path("app/build/outputs/apk/debug/app-debug.apk")
IMAGES_DIR = "images"  # beside the model on the device / in the iOS test bundle
IMAGES_INDEX = "index.txt"  # the image file names in iteration order, one a line

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


def sidecar_name(model: str | os.PathLike[str]) -> str:
    """What the sidecar is called beside the model on the phone (whatever it was called on the host)."""
    return Path(model).name + ".json"


def stage_images(files: Sequence[Path], dest: Path) -> Path:
    """Copy ``files`` to ``dest`` as 00000.<ext>, 00001.<ext>, ... with ``index.txt`` listing them in order."""
    dest.mkdir(parents=True, exist_ok=False)
    names = [f"{i:05d}{f.suffix.lower()}" for i, f in enumerate(files)]
    for f, name in zip(files, names):
        shutil.copyfile(f, dest / name)
    (dest / IMAGES_INDEX).write_text("".join(n + "\n" for n in names))
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Commands (pure)
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
    sidecar: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
) -> dict[str, list[str]]:
    """argv lists for an iOS device run (xcodebuild test, run in ``project_dir``; devicectl copy) or, with device
    None/"mac", swift run.

    On a device the model, its sidecar (as ``sidecar_name(model)``) and the staged images (``IMAGES_DIR``) are
    bundled from ``IOS_MODEL_STAGE`` and named to the test through TEST_RUNNER_ variables, which xcodebuild passes
    to the test process with the prefix removed. On a Mac ``sidecar`` and ``images`` are paths.
    """
    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    project_dir = Path(project_dir)
    name = Path(model).name
    if device in (None, "mac"):
        run = ["swift", "run", "--package-path", str(project_dir), "-c", "release", "vmoe-bench",
               "--model", str(Path(model).resolve()), "--compute-units", compute_units,
               "--warmup", str(warmup), "--iterations", str(iterations), "--output", str(result_path)]  # fmt: skip
        if sidecar is not None:
            run += ["--sidecar", str(Path(sidecar).resolve())]
        if images is not None:
            run += ["--images", str(Path(images).resolve())]
        return {"run": run}
    env = [
        f"TEST_RUNNER_VMOE_MODEL={name}",
        f"TEST_RUNNER_VMOE_COMPUTE_UNITS={compute_units}",
        f"TEST_RUNNER_VMOE_WARMUP={warmup}",
        f"TEST_RUNNER_VMOE_ITERATIONS={iterations}",
        f"TEST_RUNNER_VMOE_RESULT_NAME={IOS_RESULT_NAME}",
    ]
    if sidecar is not None:
        env.append(f"TEST_RUNNER_VMOE_SIDECAR={sidecar_name(model)}")
    if images is not None:
        env.append(f"TEST_RUNNER_VMOE_IMAGES={IMAGES_DIR}")
    test = ["env", *env, "xcodebuild", "test", "-scheme", IOS_SCHEME, "-destination", f"platform=iOS,id={device}",
            "-only-testing:VMoEBenchTests/VMoEBenchTests/testBenchmark"]  # fmt: skip
    if derived_data is not None:
        test += ["-derivedDataPath", str(derived_data)]
    cmds = {"test": test}
    if bundle_id:
        cmds["pull"] = ["xcrun", "devicectl", "device", "copy", "from", "--device", device,
                        "--domain-type", "appDataContainer", "--domain-identifier", bundle_id,
                        "--source", f"Documents/{IOS_RESULT_NAME}", "--destination", str(result_path)]  # fmt: skip
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
    sidecar: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
) -> dict[str, list[str]]:
    """argv lists for an Android run: build, install, mkdir, push (model, sidecar, images), clear, start, poll,
    pull. ``images`` is a directory made by ``stage_images``; it replaces the device's ``IMAGES_DIR``."""
    adb = ["adb", *(["-s", serial] if serial else [])]
    remote = f"{ANDROID_DEVICE_DIR}/{Path(model).name}"
    remote_sidecar = f"{ANDROID_DEVICE_DIR}/{sidecar_name(model)}"
    remote_images = f"{ANDROID_DEVICE_DIR}/{IMAGES_DIR}"
    start = [*adb, "shell", "am", "start", "-W", "-S", "-n", f"{ANDROID_PACKAGE}/{ANDROID_ACTIVITY}",
             "--es", "model", remote, "--ei", "warmup", str(warmup), "--ei", "iterations", str(iterations),
             "--es", "out", result_name]  # fmt: skip
    if threads:
        start += ["--ei", "threads", str(threads)]
    if shape:
        start += ["--es", "shape", ",".join(str(int(s)) for s in shape)]
    run_as = [*adb, "shell", "run-as", ANDROID_PACKAGE]
    cat = [*adb, "exec-out", "run-as", ANDROID_PACKAGE, "cat"]
    cmds = {
        "mkdir": [*adb, "shell", "mkdir", "-p", ANDROID_DEVICE_DIR],
        "push": [*adb, "push", str(model), remote],
        "install": [*adb, "install", "-r", "-t", str(Path(apk) if apk else Path(project_dir) / ANDROID_APK)],
        "clear": [*run_as, "rm", "-f", f"files/{result_name}", f"files/{result_name}.error.txt"],
        "start": start,
        "poll": [*run_as, "ls", "files"],
        "pull": [*cat, f"files/{result_name}"],
        "error": [*cat, f"files/{result_name}.error.txt"],
    }
    if sidecar is not None:
        cmds["push_sidecar"] = [*adb, "push", str(sidecar), remote_sidecar]
        start += ["--es", "sidecar", remote_sidecar]
    if images is not None:
        # adb push DIR REMOTE copies DIR's files into REMOTE only when REMOTE does not exist yet
        cmds["clear_images"] = [*adb, "shell", "rm", "-rf", remote_images]
        cmds["push_images"] = [*adb, "push", str(images), remote_images]
        start += ["--es", "images", remote_images]
    if apk is None:
        cmds["build"] = [gradle, "-p", str(project_dir), ":app:assembleDebug"]
    return cmds


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PhoneRun:
    """One phone run's inputs, checked on the host before anything is built or deployed."""

    model: Path
    sidecar_path: Path | None
    sidecar: Sidecar | None
    image_files: list[Path]
    warmup: int
    iterations: int
    timeout: float
    images_stage: Path | None = None  # set while the staged copy exists


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


@contextlib.contextmanager
def ios_staged(run: PhoneRun, project_dir: Path = IOS_DIR) -> Iterator[Path]:
    """Model, sidecar and images copied into the test bundle's resources (``IOS_MODEL_STAGE``), removed after."""
    stage = project_dir / IOS_MODEL_STAGE
    staged = [stage / run.model.name, stage / sidecar_name(run.model), stage / IMAGES_DIR]
    for p in staged:
        _remove(p)
    try:
        shutil.copytree(run.model, staged[0])
        if run.sidecar_path is not None:
            shutil.copyfile(run.sidecar_path, staged[1])
        if run.images_stage is not None:
            shutil.copytree(run.images_stage, staged[2])
        yield stage
    finally:
        for p in staged:
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _run_ios(run: PhoneRun, device: str | None, compute_units: str, bundle_id: str | None) -> dict[str, Any]:
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
        if not (IOS_DIR / "Package.swift").is_file():
            raise UserError(f"iOS harness not found at {IOS_DIR} (run from a source checkout of mobile-vmoe)")
    with tempfile.TemporaryDirectory(prefix="vmoe-ios-") as tmp:
        result = Path(tmp) / IOS_RESULT_NAME
        cmds = ios_commands(
            run.model, device=device, compute_units=compute_units, warmup=run.warmup,
            iterations=run.iterations, result_path=result, bundle_id=bundle_id,
            derived_data=Path(tmp) / "DerivedData", sidecar=run.sidecar_path, images=run.images_stage,
        )  # fmt: skip
        if on_mac:
            _run(cmds["run"], "swift run", run.timeout)
            return read_json(result, "iOS bench result")
        with ios_staged(run):
            proc = _run(cmds["test"], "xcodebuild test", run.timeout, cwd=IOS_DIR)
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
    run: PhoneRun,
    serial: str | None,
    threads: int | None,
    apk: str | os.PathLike[str] | None,
    shape: list[int],
) -> dict[str, Any]:
    cmds = android_commands(
        run.model, serial=serial, warmup=run.warmup, iterations=run.iterations, threads=threads, shape=shape,
        apk=apk, sidecar=run.sidecar_path, images=run.images_stage,
    )  # fmt: skip
    if "build" in cmds:
        _run(cmds["build"], "gradle build of android_bench", run.timeout)
    for step in ("install", "mkdir", "push", "push_sidecar", "clear_images", "push_images"):
        if step in cmds:
            _run(cmds[step], f"adb {step.replace('_', ' ')}", 600)
    subprocess.run(cmds["clear"], capture_output=True, text=True)  # no app data yet on a fresh install
    _run(cmds["start"], "adb shell am start", 120)
    name = cmds["pull"][-1].split("/")[-1]
    deadline = time.monotonic() + run.timeout
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
        f"no result from the Android device after {run.timeout:.0f} s (see `adb logcat -s VMoEBench`)"
    )


def _phone_inputs(
    target: str,
    model_file: str | os.PathLike[str],
    warmup: int,
    iterations: int,
    images: str | os.PathLike[str] | None,
    timeout: float,
) -> PhoneRun:
    path = Path(model_file)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    fmt = model_format(path)
    want = {"ios": "mlpackage", "android": "pte"}[target]
    if fmt != want:
        raise UserError(f"{path}: --target {target} runs .{want} files, got .{fmt}")
    check_counts(warmup, iterations)
    sidecar_path, sidecar = checked_sidecar(path)
    image_files = list_images(images)[:iterations] if images is not None else []
    if image_files:
        if sidecar is not None and sidecar.takes_tokens:
            raise UserError(f"{path}: a text encoder takes tokens, not images: bench it without --images")
        if sidecar is None:
            raise UserError(
                f"{path}: --images on a phone needs the export sidecar {sidecar_name(path)} beside it: the "
                "harness takes the preprocessing (resize, crop, mean, std) from it"
            )
        check_image_input(path, sidecar.input_shape, sidecar.preprocess, f"from its sidecar {sidecar_path}")
    return PhoneRun(path, sidecar_path, sidecar, image_files, warmup, iterations, timeout)


def _complete(
    doc: Any, target: str, run: PhoneRun, images: Any, delegates: list[str] | None
) -> dict[str, Any]:
    """Validate the pulled result, recompute its stats and add what the host knows (sidecar, delegates,
    latency per routed expert)."""
    where = f"result pulled from the {target} device"
    doc = ingest_result(doc, source=where)
    sc = run.sidecar
    doc["model"]["sidecar"] = doc["model"].get("sidecar") or (sc.to_dict() if sc else None)
    doc["model"]["routing"] = doc["model"].get("routing") or routing_of(sc)
    doc["model"]["name"] = doc["model"].get("name") or (sc.model if sc else None)
    if delegates and not doc["backend"].get("delegates"):  # the phone cannot list them; the host can
        doc["backend"]["delegates"] = delegates
        doc["backend"]["name"] = "xnnpack" if "XnnpackBackend" in delegates else doc["backend"]["name"]
    if doc.get("precision") is None and sc:
        doc["precision"] = sc.precision
    if run.image_files and doc["input"]["source"] == "images":
        doc["input"]["images"] = {"dir": str(images), "count": len(run.image_files)}
        notes = [n for n in doc["notes"] if not n.startswith("latency_per_expert:")]
        ckpt = sidecar_checkpoint(sc, run.sidecar_path)
        eager = None
        if ckpt is not None:
            from ..checkpoint import load_model

            eager, _ = load_model(ckpt)
        assert sc is not None  # images need a sidecar (_phone_inputs)
        doc["latency_per_expert"] = per_expert_latency(
            doc["samples_ms"], run.image_files, sc.preprocess, eager, notes
        )
        doc["notes"] = notes
    return validate_result(doc, where)


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
    images: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Build, deploy, run and pull on an iOS or Android device; validate and complete the pulled result."""
    run = _phone_inputs(target, model_file, warmup, iterations, images, timeout)
    delegates = None
    if target == "android":
        _require(["adb"] + ([] if apk else ["gradle"]), ANDROID_MISSING)
        if apk is not None and not Path(apk).is_file():
            raise UserError(f"--apk: file not found: {apk}")
        shape, delegates = probe_model(run.model, "pte")  # opens the untrusted file in a child process
        if run.image_files and run.sidecar is not None:
            check_image_input(
                run.model, shape, run.sidecar.preprocess, f"from its sidecar {run.sidecar_path}"
            )
    with tempfile.TemporaryDirectory(prefix="vmoe-phone-") as tmp:
        if run.image_files:
            run.images_stage = stage_images(run.image_files, Path(tmp) / IMAGES_DIR)
        if target == "ios":
            doc = _run_ios(run, device, compute_units, bundle_id)
        else:
            doc = _run_android(run, device, threads, apk, shape)
    doc = _complete(doc, target, run, images, delegates)
    write_json_atomic(json_out, store_paths(doc, json_out, RESULT_PATHS))
    return doc
