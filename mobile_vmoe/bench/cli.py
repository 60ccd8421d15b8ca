"""The `bench` verb: `mobile-vmoe bench FILE --json OUT`, `bench --target ios|android`, `bench report`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..common import UserError
from .compare import report
from .host import bench
from .phones import COMPUTE_UNITS, bench_device

__all__ = ["add_cli"]


def _summary(doc: dict[str, Any]) -> str:
    s = doc["stats"]
    return (
        f"{doc['model']['name'] or doc['model']['path']} on {doc['runtime']['name']} {doc['backend']['name']}: "
        f"p50 {s['p50']:.3f} ms, p90 {s['p90']:.3f} ms, mean {s['mean']:.3f} ± {s['std']:.3f} ms "
        f"(n={s['count']}), cold load {doc['cold_load_ms']:.1f} ms, first {doc['first_inference_ms']:.2f} ms"
    )


def _cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # progress lines when stderr is not a terminal
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
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
            images=args.images,
        )
    print(_summary(doc))
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
        "--images",
        default=None,
        help="directory of images (ImageFolder or flat): one per timed run, preprocessed as the sidecar says "
        "(host and phones)",
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
