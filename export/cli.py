"""`mobile-vmoe export`: the CLI verb of the export stage (calls ``export_model``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from mobile_vmoe.common import UserError
from mobile_vmoe.models.token_moe import PRIORITY_FLAGS

from .core import DEFAULT_NUM_CALIBRATE, DEFAULT_NUM_VERIFY, FORMATS, export_model
from .image_text import PARTS
from .pte import INT8_SCHEMES
from .verify import VerificationError


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """['depth=3', 'num_experts=4', 'router_summary=cls'] -> {'depth': 3, ...}; values are JSON where they parse."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model-kwargs {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # progress lines off a terminal (library chatter: see quiet.py)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        export_model(
            args.format,
            args.out,
            checkpoint=args.checkpoint,
            model=args.model,
            model_kwargs=parse_model_kwargs(args.model_kwargs),
            quantize=args.quantize,
            data=args.data,
            data_root=args.data_root,
            num_verify=args.num_verify,
            num_calibrate=args.num_calibrate,
            atol=args.atol,
            min_top1_agreement=args.min_agreement,
            coreml_input=args.coreml_input,
            coreml_precision=args.coreml_precision,
            palettize_bits=args.palettize_bits,
            expert_dispatch=args.expert_dispatch,
            capacity_ratio=args.capacity_ratio,
            priority=args.priority,
            part=args.part,
            seed=args.seed,
        )
    except VerificationError as e:
        print(f"mobile-vmoe export: verification failed, nothing written: {e}", file=sys.stderr)
        return 1
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ExecuTorch .pte, Core ML .mlpackage or ONNX, verified against eager PyTorch",
        description="Export a checkpoint (or a named model with random weights) and verify the artifact: "
        "run it (ExecuTorch, ONNX Runtime) on real images against eager PyTorch, or check the Core ML program's "
        "structure. Exit code 1 when verification fails (nothing is written), 2 on bad input.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model .safetensors file or run directory")
    src.add_argument("--model", help="registered model name, RANDOM weights (latency work only)")
    p.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", help="with --model: timm kwargs")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="pte | coreml | onnx")
    p.add_argument(
        "--quantize",
        choices=sorted(INT8_SCHEMES),
        default=None,
        help="pte: int8 = PT2E dynamic int8 transformer linears, int8-static = PT2E static int8 calibrated on real images; "
        "coreml: int8 = int8 weights",
    )
    p.add_argument("--out", default=None, help="artifact path (default: <checkpoint or model name>.<ext>)")
    p.add_argument(
        "--data",
        default=None,
        help="images to verify/calibrate on: dataset dir or synthetic|digits "
        "(default: the checkpoint's held-out list, else synthetic)",
    )
    p.add_argument("--data-root", default="data", help="where built-in datasets live (default: data)")
    p.add_argument("--num-verify", type=int, default=DEFAULT_NUM_VERIFY, help="images compared (500)")
    p.add_argument(
        "--num-calibrate",
        type=int,
        default=DEFAULT_NUM_CALIBRATE,
        help="int8 images: int8-static calibrates on this many training images, int8 chooses its fp32 "
        "layers on this many held-out images that verification does not use (500)",
    )
    p.add_argument("--atol", type=float, default=None, help="max abs logit difference (fp32 default 1e-4)")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="min top-1 agreement (fp32 default 1.0; int8 default 0.99, enforced for trained weights only "
        "unless given here)",
    )
    p.add_argument("--coreml-input", choices=["image", "tensor"], default="image")
    p.add_argument("--coreml-precision", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--palettize-bits", type=int, default=None, help="coreml: k-means weight palettisation")
    p.add_argument(
        "--capacity-ratio",
        type=float,
        default=None,
        help="per-token V-MoE: expert buffer size of the export (default: the model's inference value)",
    )
    p.add_argument(
        "--priority",
        choices=list(PRIORITY_FLAGS),
        default=None,
        help="per-token V-MoE: Batch Priority Routing, tokens in order, or BPR with the class token first "
        "(ours) (default: the model's, BPR)",
    )
    p.add_argument(
        "--expert-dispatch",
        choices=["switch", "gather"],
        default=None,
        help="MoE experts in pte/onnx: switch (default; one cond branch per expert, weights packed at load) or "
        "gather (lowers ~4x faster, costs ~3-5%% latency)",
    )
    p.add_argument(
        "--part",
        choices=list(PARTS),
        default=None,
        help="image-text models (mobile_limoe_*, mobile_onetower_*, mobile_clip_*): image = zero-shot classifier "
        "with the checkpoint's class-prompt embeddings baked in (default), text = the text encoder "
        "(int64 tokens [1, L] -> normalised embedding [1, P])",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --model")
    p.set_defaults(func=_run)
