"""`mobile-vmoe VERB ...`: one verb per pipeline stage.

Each stage module exposes ``add_cli(subparsers)``, which adds its verb and sets ``func`` to a function taking the
parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import UserError

# verb -> module that owns it
STAGES: dict[str, str] = {
    "models": "mobile_vmoe.cli",
    "dataset": "mobile_vmoe.data",
    "train": "mobile_vmoe.train",
    "eval": "mobile_vmoe.evaluate",
    "superclasses": "mobile_vmoe.superclasses",
    "export": "mobile_vmoe.export.cli",
    "bench": "mobile_vmoe.bench",
    "pipeline": "mobile_vmoe.pipeline",
}


def models_table(names: list[str] | None = None) -> str:
    """A Markdown table of registered models: params, params active per image, forward FLOPs per image."""
    import timm

    from .models import profile_model

    names = names or timm.list_models("mobile_v*")
    rows = [
        "| model | kind | image | params (M) | active params (M) | GFLOPs / image |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in names:
        m = timm.create_model(name)
        p = profile_model(m)
        kind = f"MoE E={m.num_experts} K={m.top_k} L={m.num_moe_layers}" if m.is_moe else "dense"
        size = m.pretrained_cfg["input_size"][-1]
        rows.append(
            f"| {name} | {kind} | {size} px | {p.params / 1e6:.2f} | {p.active_params / 1e6:.2f} | {p.flops / 1e9:.3f} |"
        )
    return "\n".join(rows)


def _models(args: argparse.Namespace) -> int:
    print(models_table(args.names or None))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="table of registered models: params, active params, FLOPs per image")
    p.add_argument(
        "names", nargs="*", help="model names (default: every mobile_vit_* and mobile_vmoe_* model)"
    )
    p.set_defaults(func=_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobile-vmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in STAGES.values():
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"mobile-vmoe {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
