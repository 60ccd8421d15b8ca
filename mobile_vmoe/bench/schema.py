"""The bench result document (schema 1.0, ``mobile_vmoe/schemas/bench_result.schema.json``, docs/BENCH_SCHEMA.md).

``latency_stats`` is the one function that turns samples into p50/p90/p99/mean/std/min/max: host runs use it,
and phone results are re-computed with it when they are pulled or reported.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..common import UserError, load_paths, read_json, store_paths, write_json_atomic

__all__ = [
    "RESULT_PATHS",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "expert_latency",
    "ingest_result",
    "latency_stats",
    "load_schema",
    "validate_result",
    "write_result",
]

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "bench_result.schema.json"
# Host paths a result file stores relative to its folder when inside the directory moving with it (a pipeline
# directory: common.store_paths), absolute otherwise; ingest_result makes them absolute again
RESULT_PATHS = (
    "model.path", "model.sidecar.checkpoint", "model.sidecar.images.data_dir", "model.sidecar.images.heldout_list",
    "input.images.dir",
)  # fmt: skip


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
        st = latency_stats([t for t, x in zip(samples_ms, experts) if int(x) == e])
        out[str(e)] = {"count": st["count"], "p50": st["p50"], "mean": st["mean"]}
    return out


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def validate_result(doc: Any, source: str = "result") -> dict[str, Any]:
    """Check ``doc`` against the schema, that every sample is finite and that there are ``timed_iterations`` of
    them; a UserError names ``source`` (the file) and the JSON path."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if err is not None:
        raise UserError(
            f"{source}: not a valid bench result (schema {SCHEMA_VERSION}) at {err.json_path}: {err.message}"
        )
    # JSON numbers pass the schema as NaN / Infinity too (Python's json reads them)
    bad = [i for i, t in enumerate(doc["samples_ms"]) if not math.isfinite(t)]
    if bad:
        raise UserError(
            f"{source}: $.samples_ms[{bad[0]}] is {doc['samples_ms'][bad[0]]}: every sample must be a finite "
            f"number of milliseconds ({len(bad)} are not)"
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
        doc = load_paths(doc, path_or_doc, RESULT_PATHS) if isinstance(doc, dict) else doc
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


def write_result(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Validate ``doc``, recompute its stats from its samples (``ingest_result``) and write it atomically."""
    write_json_atomic(path, store_paths(ingest_result(doc, str(path)), path, RESULT_PATHS))
    return Path(path)
