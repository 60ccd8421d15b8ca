"""Latency benchmarks with one result schema: host (ExecuTorch / ONNX Runtime / eager torch), iOS (Core ML,
``ios_bench/``) and Android (ExecuTorch, ``android_bench/``).

    schema.py    the result document: load / validate / ingest, ``latency_stats``, ``expert_latency``
    host.py      `bench FILE`: inputs (model file, sidecar, images, preprocessing), the host's document
    runtime.py   what opens a model file (probe, timing), in a fresh child process; device/thermal/memory facts
    phones.py    `bench --target ios|android`: commands, staging, build / deploy / run / pull
    compare.py   `bench report`: Markdown table and PNG
    cli.py       the `bench` verb
"""

from .cli import add_cli
from .compare import report
from .host import bench, list_images, load_images, model_format
from .phones import (
    ANDROID_ACTIVITY,
    ANDROID_DEVICE_DIR,
    ANDROID_PACKAGE,
    COMPUTE_UNITS,
    IMAGES_DIR,
    IMAGES_INDEX,
    IOS_RESULT_NAME,
    IOS_SCHEME,
    android_commands,
    bench_device,
    ios_commands,
    stage_images,
)
from .runtime import host_device, host_thermal, probe_model
from .schema import (
    SCHEMA_VERSION,
    expert_latency,
    ingest_result,
    latency_stats,
    load_schema,
    validate_result,
)

__all__ = [
    "ANDROID_ACTIVITY",
    "ANDROID_DEVICE_DIR",
    "ANDROID_PACKAGE",
    "COMPUTE_UNITS",
    "IMAGES_DIR",
    "IMAGES_INDEX",
    "IOS_RESULT_NAME",
    "IOS_SCHEME",
    "SCHEMA_VERSION",
    "add_cli",
    "android_commands",
    "bench",
    "bench_device",
    "expert_latency",
    "host_device",
    "host_thermal",
    "ingest_result",
    "ios_commands",
    "latency_stats",
    "list_images",
    "load_images",
    "load_schema",
    "model_format",
    "probe_model",
    "report",
    "stage_images",
    "validate_result",
]
