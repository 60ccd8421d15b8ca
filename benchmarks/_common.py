"""What several benchmarks share: the test fixtures (planted confusion matrices) from tests/fixtures.py, and the
side-by-side latency measurement of exported models (export_latency.py, token_export_latency.py).

Latency method: models of one runtime run in interleaved rounds (every model once per round, in shuffled order)
so that load on a shared machine hits all of them alike; ratios are of the medians over all rounds. Each runtime
is timed in a fresh process of its own, after everything has been exported: in one process, ONNX Runtime's
sessions slowed the ExecuTorch MoE more than the dense model (MoE/dense +0.01 with the sessions merely loaded,
up to +0.04 when they ran in between).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the repository's tests/ folder

from fixtures import planted_confusion  # noqa: E402

import mobile_vmoe.models  # noqa: E402, F401  (registers the model names)
from mobile_vmoe.bench import latency_stats  # noqa: E402

__all__ = [
    "Goal",
    "Ratio",
    "build",
    "lower_artifact",
    "num_rounds",
    "planted_confusion",
    "print_medians",
    "print_ratios",
    "run_interleaved",
    "time_runtime",
    "time_runtimes",
    "timing_args",
]

RUNTIME_NAMES = {"pte": "executorch", "onnx": "onnxruntime"}


class Goal(NamedTuple):
    """A ratio's goal: ``value <= bound`` (or ``value < bound`` when ``strict``)."""

    bound: float
    strict: bool = False

    def met(self, value: float) -> bool:
        return value < self.bound if self.strict else value <= self.bound

    def __str__(self) -> str:
        return f"{'<' if self.strict else '<='}{self.bound:.2f}"


class Ratio(NamedTuple):
    """One printed ratio: the median latency of ``num`` over that of ``den``, both models of ``runtime``."""

    tag: str  # the letter of the benchmark's doc, e.g. "a"
    label: str
    runtime: str  # "pte" | "onnx"
    num: str
    den: str
    goal: Goal | None = None  # None: for information


def build(name: str, **kwargs: object) -> torch.nn.Module:
    """An eval-mode timm model with seeded random weights (latency does not depend on them)."""
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def lower_artifact(
    fmt: str, path: Path, model: torch.nn.Module, example: torch.Tensor, **pte_kwargs: Any
) -> Path:
    """``model`` lowered to ``path`` (``.pte`` through export's ``lower_pte``, else ``.onnx``), its time printed."""
    from mobile_vmoe.export.onnx_export import export_onnx
    from mobile_vmoe.export.pte import lower_pte

    t0 = time.perf_counter()
    if fmt == "pte":
        path.write_bytes(lower_pte(model, example, **pte_kwargs)[0])
    else:
        export_onnx(model, example, path)
    print(f"lowered {fmt} {path.stem} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def timing_args(ap: argparse.ArgumentParser, rounds: int, quick_rounds: int) -> None:
    """Add --quick, --rounds, --iters, --warmup, --threads and --profile to ``ap``."""
    ap.add_argument("--quick", action="store_true", help="nano models at 32 px instead of ViT-Tiny at 224 px")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"interleaved rounds (default {rounds}, quick {quick_rounds})",
    )
    ap.add_argument("--iters", type=int, default=10, help="timed runs per model per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per model before the first round")
    ap.add_argument("--threads", type=int, default=None, help="ExecuTorch / ONNX Runtime threads")
    ap.add_argument(
        "--profile", action="store_true", help="also an ETDump profile of each fp32 .pte: where the time goes"
    )
    ap.set_defaults(default_rounds=(rounds, quick_rounds))


def num_rounds(args: argparse.Namespace) -> int:
    """--rounds, or the default of ``timing_args`` for a full or a --quick run."""
    return args.rounds or args.default_rounds[args.quick]


def time_runtime(
    runtime: str,
    paths: dict[str, str],
    x: torch.Tensor,
    rounds: int,
    iters: int,
    warmup: int,
    threads: int | None,
) -> dict[str, list[float]]:
    """Per-run latencies (ms) of the models of one runtime, in interleaved rounds; runs in a child process."""
    from mobile_vmoe.export.onnx_export import OnnxRunner
    from mobile_vmoe.export.pte import PteRunner

    if runtime == "pte" and threads:
        # Before any program is loaded: resetting the pool under loaded XNNPACK programs hangs the next run.
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
    runners = {
        k: PteRunner(p) if runtime == "pte" else OnnxRunner(p, threads=threads) for k, p in paths.items()
    }
    return run_interleaved(runners, x, rounds, iters, warmup)


def run_interleaved(
    runners: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int, iters: int, warmup: int
) -> dict[str, list[float]]:
    """Per-run latencies (ms) of each runner on ``x``: ``warmup`` untimed runs each, then interleaved rounds."""
    for k in runners:
        for _ in range(warmup):
            runners[k](x)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    rng = random.Random(0)
    for _ in range(rounds):
        # A new order every round, so that no model always follows the same one.
        for k in rng.sample(list(runners), len(runners)):
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                runners[k](x)
                samples[k].append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def time_runtimes(
    paths: dict[str, Path], x: torch.Tensor, rounds: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Latencies (ms) of every model of ``paths`` ("<runtime>/<key>" -> file), each runtime in a fresh process."""
    samples: dict[str, list[float]] = {}
    ctx = multiprocessing.get_context("spawn")
    for rt in RUNTIME_NAMES:
        group = {k: str(v) for k, v in paths.items() if k.startswith(rt + "/")}
        if not group:
            continue
        with ctx.Pool(1) as pool:
            samples.update(
                pool.apply(time_runtime, (rt, group, x, rounds, args.iters, args.warmup, args.threads))
            )
    return samples


def print_medians(title: str, samples: dict[str, list[float]]) -> None:
    print(f"\n{title}, median ms:")
    for k, v in samples.items():
        print(f"  {k:30s} {latency_stats(v)['p50']:8.2f}")


def print_ratios(
    rows: list[Ratio], samples: dict[str, list[float]], iters: int, floors: dict[str, float] | None = None
) -> None:
    """Each ratio of medians with its goal, and the spread of the per-round ratios (middle half); with
    ``floors`` (``_floor.py``: "<runtime>/<key>" -> ms) also the ratio of the two models' floors."""
    # The spread shows how much of a value is this machine's noise: on a shared 2-core host a single round's
    # ratio moves by several percent.
    med = {k: latency_stats(v)["p50"] for k, v in samples.items()}
    width = max(len(r.label) for r in rows)
    floor_head = "  floor" if floors else ""
    print(f"\nratio{' ' * (width + 1)}runtime        value  goal   met   rounds p25-p75{floor_head}")
    for r in rows:
        num, den = f"{r.runtime}/{r.num}", f"{r.runtime}/{r.den}"
        a, b = samples[num], samples[den]
        v = med[num] / med[den]
        per_round = [
            float(np.median(a[i : i + iters]) / np.median(b[i : i + iters])) for i in range(0, len(a), iters)
        ]
        lo, hi = np.percentile(per_round, [25, 75])
        verdict = "  -       -  " if r.goal is None else f"{r.goal!s:6s} {'yes' if r.goal.met(v) else 'NO '}"
        floor = ""
        if floors and (num in floors or den in floors):
            floor = f"  {floors.get(num, med[num]) / floors.get(den, med[den]):6.3f}"
        print(
            f"({r.tag}) {r.label:{width}s} {RUNTIME_NAMES[r.runtime]:12s} {v:6.3f}  {verdict}  {lo:.3f}-{hi:.3f}"
            f"{floor}"
        )
