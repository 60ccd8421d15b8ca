"""Where an exported model's time goes in the ExecuTorch runtime: an ETDump per-operator profile, summed by kind,
printed beside a base model's (``--profile`` of token_export_latency.py and limoe_latency.py).

The kinds: XNNPACK's linears (``Fully Connected`` GEMMs), its other operators, the delegate calls' own cost (a
call's time less its operators'), the portable kernels (``OPERATOR_CALL``: ops XNNPACK does not take, such as the
routing's topk, cumsum and gathers) and the rest of ``Method::execute``. ETDump's event tracing adds its own cost,
so these totals run a little above the timed latencies; the differences between models are what they are for.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import num_rounds, run_interleaved

KINDS = ("xnnpack linear", "xnnpack other", "delegate calls", "portable kernels", "runtime other", "total")


def profile_ptes(
    paths: dict[str, Path], x: torch.Tensor, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """The profile of each ``.pte`` of ``paths`` ("pte/<key>" -> file) by key, all in one fresh process and in
    interleaved rounds like the timings (``_common.time_runtime``): one process per model, one after the other,
    let the machine's drift show as differences between models."""
    ptes = {key[4:]: str(path) for key, path in paths.items() if key.startswith("pte/")}
    rounds = min(num_rounds(args), 10)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_profile, (ptes, x, rounds, args.iters, args.warmup, args.threads))


def _profile(
    ptes: dict[str, str], x: torch.Tensor, rounds: int, iters: int, warmup: int, threads: int | None
) -> dict[str, dict[str, float]]:
    """Median ms per kind (``KINDS``) of each program over ``rounds`` x ``iters`` runs, plus its number of
    delegate and portable calls per run."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    if threads:  # before any program is loaded (see _common.time_runtime)
        portable_lib._unsafe_reset_threadpool(threads)
    modules = {k: portable_lib._load_for_executorch(p, enable_etdump=True) for k, p in ptes.items()}
    run_interleaved(
        {k: (lambda t, m=m: m.forward([t])) for k, m in modules.items()}, x, rounds, iters, warmup
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, m in modules.items():
            dump = str(Path(tmp) / f"{k}.etdp")
            m.write_etdump_result_to_file(dump)
            out[k] = _by_kind(Inspector(etdump_path=dump))
    return out


def _by_kind(inspector: Any) -> dict[str, float]:
    t = dict.fromkeys(KINDS, 0.0) | {"delegate call count": 0.0, "portable call count": 0.0}
    delegate_ops = 0.0
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            if ev.perf_data is None:
                continue
            ms = statistics.median(ev.perf_data.raw)
            if ev.name == "Method::execute":
                t["total"] += ms
            elif ev.name == "DELEGATE_CALL":
                t["delegate calls"] += ms
                t["delegate call count"] += 1
            elif ev.name == "OPERATOR_CALL":
                t["portable kernels"] += ms
                t["portable call count"] += 1
            elif ev.name.startswith("native_call_"):
                continue  # inside its OPERATOR_CALL
            else:  # an operator inside a delegate call
                t["xnnpack linear" if ev.name.startswith("Fully Connected") else "xnnpack other"] += ms
                delegate_ops += ms
    t["delegate calls"] -= delegate_ops
    t["runtime other"] = t["total"] - t["delegate calls"] - delegate_ops - t["portable kernels"]
    return t


def print_profiles(prof: dict[str, dict[str, float]], base: str) -> None:
    """ms per kind of each profiled model and, for every model but ``base``, its excess over ``base``."""
    print(f"\nETDump profile, median ms per run (excess over {base} in brackets):")
    print(f"  {'model':16s}" + "".join(f"{k:>19s}" for k in KINDS) + "   calls: delegate / portable")
    for key, t in prof.items():
        cells = "".join(
            f"{t[k]:7.2f}" + (f" ({t[k] - prof[base][k]:+6.2f})  " if key != base else " " * 12)
            for k in KINDS
        )
        print(f"  {key:16s}{cells}   {t['delegate call count']:.0f} / {t['portable call count']:.0f}")
