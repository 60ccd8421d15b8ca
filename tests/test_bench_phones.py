"""Phone drivers: the commands, what travels with the model (sidecar, images), refusals before any work.

No Xcode or Android SDK here: the harnesses are checked for agreeing with the driver on names, and the driver's
commands and staging are checked as they are built."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mobile_vmoe.bench as B
from mobile_vmoe.bench.phones import IOS_MODEL_STAGE, PhoneRun, ios_staged
from mobile_vmoe.cli import main
from mobile_vmoe.common import UserError
from mobile_vmoe.files.sidecar import Sidecar, write_sidecar
from mobile_vmoe.preprocess import INTERPOLATIONS, Preprocess

REPO = Path(__file__).resolve().parents[1]
KOTLIN = REPO / "android_bench/app/src/main/java/org/mobilevmoe/bench"
SWIFT = REPO / "ios_bench"


def _sidecar(fmt: str, artifact: str, size: int = 32, pre_size: int | None = None) -> Sidecar:
    pre = pre_size or size
    return Sidecar(
        format=fmt, artifact=artifact, model="mobile_vit_nano_patch8_32", model_kwargs={}, class_names=["a", "b"],
        input_shape=[1, 3, size, size], preprocess=Preprocess(size=pre, resize=pre + 4), precision="fp32",
    )  # fmt: skip


@pytest.fixture
def images(tmp_path):
    """Five images in an ImageFolder tree (sorted order interleaves the classes)."""
    d = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(5):
        (d / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"c{i % 2}" / f"{i}.png")
    return d


def test_ios_commands():
    c = B.ios_commands("/m/model.mlpackage", device="00008110-ABC", compute_units="cpuAndNeuralEngine",
                       warmup=5, iterations=20, result_path="/tmp/r.json", bundle_id="com.example.runner")  # fmt: skip
    t = c["test"]
    assert t[0] == "env" and "TEST_RUNNER_VMOE_MODEL=model.mlpackage" in t
    assert "TEST_RUNNER_VMOE_COMPUTE_UNITS=cpuAndNeuralEngine" in t and "TEST_RUNNER_VMOE_ITERATIONS=20" in t
    assert not any("VMOE_SIDECAR" in a or "VMOE_IMAGES" in a for a in t)
    i = t.index("xcodebuild")
    assert t[i : i + 6] == ["xcodebuild", "test", "-scheme", B.IOS_SCHEME, "-destination",
                            "platform=iOS,id=00008110-ABC"]  # fmt: skip
    assert c["pull"] == [
        "xcrun", "devicectl", "device", "copy", "from", "--device", "00008110-ABC", "--domain-type",
        "appDataContainer", "--domain-identifier", "com.example.runner", "--source",
        f"Documents/{B.IOS_RESULT_NAME}", "--destination", "/tmp/r.json",
    ]  # fmt: skip
    mac = B.ios_commands("/m/model.mlpackage", device=None)["run"]
    assert mac[:2] == ["swift", "run"] and mac[mac.index("--compute-units") + 1] == "all"
    assert "--sidecar" not in mac and "--images" not in mac
    with pytest.raises(UserError, match="compute-units"):
        B.ios_commands("/m/model.mlpackage", device="x", compute_units="gpu")


def test_ios_commands_carry_sidecar_and_images():
    """On a device both are bundled under fixed names; on a Mac they are paths."""
    extra = {"sidecar": "/m/model.json", "images": "/s/images"}
    t = B.ios_commands("/m/model.mlpackage", device="UDID", **extra)["test"]
    env = t[1 : t.index("xcodebuild")]
    assert "TEST_RUNNER_VMOE_SIDECAR=model.mlpackage.json" in env  # whatever the host called it
    assert f"TEST_RUNNER_VMOE_IMAGES={B.IMAGES_DIR}" in env
    mac = B.ios_commands("/m/model.mlpackage", device="mac", **extra)["run"]
    assert (
        mac[mac.index("--sidecar") + 1] == extra["sidecar"]
        and mac[mac.index("--images") + 1] == extra["images"]
    )


def test_android_commands():
    c = B.android_commands("/m/model.pte", serial="emulator-5554", warmup=3, iterations=7, threads=4,
                           shape=[1, 3, 32, 32])  # fmt: skip
    adb = ["adb", "-s", "emulator-5554"]
    assert c["push"] == [*adb, "push", "/m/model.pte", f"{B.ANDROID_DEVICE_DIR}/model.pte"]
    assert c["install"][:4] == [*adb, "install"] and c["install"][-1].endswith("app-debug.apk")
    s = c["start"]
    assert s[: len(adb) + 3] == [*adb, "shell", "am", "start"]
    assert s[s.index("-n") + 1] == f"{B.ANDROID_PACKAGE}/{B.ANDROID_ACTIVITY}"
    opts = {s[i + 1]: s[i + 2] for i in range(len(s) - 2) if s[i] in ("--es", "--ei")}
    assert opts == {"model": f"{B.ANDROID_DEVICE_DIR}/model.pte", "warmup": "3", "iterations": "7",
                    "out": "vmoe_bench.json", "threads": "4", "shape": "1,3,32,32"}  # fmt: skip
    assert c["pull"] == [*adb, "exec-out", "run-as", B.ANDROID_PACKAGE, "cat", "files/vmoe_bench.json"]
    assert c["build"][0] == "gradle" and c["build"][-1] == ":app:assembleDebug"
    assert not {"push_sidecar", "clear_images", "push_images"} & set(c)
    assert "build" not in B.android_commands("/m/model.pte", apk="/x/app.apk")


def test_android_commands_push_sidecar_and_images():
    c = B.android_commands("/m/model.pte", sidecar="/m/model.json", images="/s/images")
    remote_images = f"{B.ANDROID_DEVICE_DIR}/{B.IMAGES_DIR}"
    assert c["push_sidecar"] == ["adb", "push", "/m/model.json", f"{B.ANDROID_DEVICE_DIR}/model.pte.json"]
    # adb push DIR REMOTE copies DIR's files into REMOTE only when REMOTE does not exist: cleared first
    assert c["clear_images"] == ["adb", "shell", "rm", "-rf", remote_images]
    assert c["push_images"] == ["adb", "push", "/s/images", remote_images]
    s = c["start"]
    opts = {s[i + 1]: s[i + 2] for i in range(len(s) - 2) if s[i] == "--es"}
    assert opts["sidecar"] == f"{B.ANDROID_DEVICE_DIR}/model.pte.json" and opts["images"] == remote_images


def test_stage_images_keeps_the_host_order(images, tmp_path):
    files = B.list_images(images)[:4]  # what the host and the phone both run: the first `iterations`
    staged = B.stage_images(files, tmp_path / "stage")
    names = (staged / B.IMAGES_INDEX).read_text().splitlines()
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [(staged / n).read_bytes() for n in names] == [f.read_bytes() for f in files]
    assert sorted(p.name for p in staged.iterdir()) == sorted([*names, B.IMAGES_INDEX])


def test_ios_staging_bundles_model_sidecar_images_and_cleans_up(images, tmp_path):
    model = tmp_path / "model.mlpackage"
    (model / "Data").mkdir(parents=True)
    (model / "Data" / "weights.bin").write_bytes(b"w")
    sidecar_path = write_sidecar(model, _sidecar("coreml", model.name))
    staged_images = B.stage_images(B.list_images(images), tmp_path / "stage")
    run = PhoneRun(model, sidecar_path, None, [], 0, 1, 1.0, images_stage=staged_images)
    project = tmp_path / "ios_bench"
    stage = project / IOS_MODEL_STAGE
    stage.mkdir(parents=True)
    (stage / "README.md").write_text("kept")
    with pytest.raises(RuntimeError, match="xcodebuild failed"):
        with ios_staged(run, project) as where:
            assert (where / "model.mlpackage" / "Data" / "weights.bin").read_bytes() == b"w"
            assert (where / "model.mlpackage.json").read_bytes() == sidecar_path.read_bytes()
            assert (where / B.IMAGES_DIR / B.IMAGES_INDEX).read_text().count("\n") == 5
            raise RuntimeError("xcodebuild failed")
    assert sorted(p.name for p in stage.iterdir()) == ["README.md"]


def test_drivers_refuse_without_tools(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    pte = tmp_path / "model.pte"
    pte.write_bytes(b"not opened: the tools are checked first")
    out = str(tmp_path / "r.json")
    assert main(["bench", "--target", "android", str(pte), "--json", out]) == 2
    err = capsys.readouterr().err
    assert "adb not found" in err and "platform-tools" in err and "gradle not found" in err
    mlpkg = tmp_path / "m.mlpackage"
    mlpkg.mkdir()
    with pytest.raises(UserError, match="xcodebuild not found.*Xcode"):
        B.bench_device("ios", mlpkg, json_out=out, device="00008110-ABC")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(UserError, match="runs .pte files"):
        B.bench_device("android", onnx, json_out=out)
    assert not (tmp_path / "r.json").exists()


def test_phone_images_need_a_sidecar_that_fits(images, tmp_path):
    pte = tmp_path / "model.pte"
    pte.write_bytes(b"a program")
    with pytest.raises(
        UserError, match=r"model\.pte: --images on a phone needs the export sidecar model\.pte\.json"
    ):
        B.bench_device("android", pte, json_out=tmp_path / "r.json", images=images)
    # a sidecar whose input is not what its preprocessing makes
    write_sidecar(pte, _sidecar("pte", pte.name, size=64, pre_size=32))
    with pytest.raises(UserError, match=r"model\.pte: its input is \[1, 3, 64, 64\].*\[1, 3, 32, 32\]"):
        B.bench_device("android", pte, json_out=tmp_path / "r.json", images=images)


def test_harnesses_agree_with_the_driver():
    """Names the driver and the Swift / Kotlin harnesses must share (neither can be compiled here)."""
    swift_pre = (SWIFT / "Sources/VMoEBench/Preprocess.swift").read_text()
    kotlin_pre = (KOTLIN / "Preprocess.kt").read_text()
    for source in (swift_pre, kotlin_pre):
        assert f'"{B.IMAGES_INDEX}"' in source
        for name in INTERPOLATIONS:  # every interpolation a sidecar may name
            assert f'"{name}"' in source
    tests = (SWIFT / "Tests/VMoEBenchTests/VMoEBenchTests.swift").read_text()
    for var in ("VMOE_MODEL", "VMOE_SIDECAR", "VMOE_IMAGES", "VMOE_COMPUTE_UNITS", "VMOE_ITERATIONS"):
        assert f'"{var}"' in tests
    main_swift = (SWIFT / "Sources/vmoe-bench/main.swift").read_text()
    assert '"--sidecar"' in main_swift and '"--images"' in main_swift
    activity = (KOTLIN / "BenchmarkActivity.kt").read_text()
    for extra in ("model", "shape", "warmup", "iterations", "threads", "out", "sidecar", "images"):
        assert f'Extra("{extra}"' in activity
