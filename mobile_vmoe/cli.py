"""`mobile-vmoe [-v] VERB ...`: one verb per pipeline stage, and the console every verb shares.

Each stage module exposes ``add_cli(subparsers)``, which adds its verb and sets ``func`` to a function taking the
parsed arguments and returning an exit code.

Console: quiet by default (this package's INFO lines, progress bars on a terminal; other libraries only show
errors); ``-v`` adds this package's DEBUG lines and other libraries' INFO logs and warnings.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from .common import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)
PROGRESS_LOG_SECONDS = 30.0  # without a terminal, a long loop logs how far it got at most this often

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
    from .models.names import project_models

    names = names or project_models()
    rows = [
        "| model | kind | image | params (M) | active params (M) | GFLOPs / image |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in names:
        m = timm.create_model(name)
        p = profile_model(m)
        kind = f"MoE E={m.num_experts} K={m.top_k} L={m.num_moe_layers}" if m.is_moe else "dense"
        if getattr(m, "moe_routing", None) == "token":
            kind = f"per-token MoE E={m.num_experts} K={m.top_k} L={m.num_moe_layers}"
        if getattr(m, "is_image_text", False):  # GFLOPs: one image and one caption
            kind = f"image-text, {kind}"
        size = m.pretrained_cfg["input_size"][-1]
        rows.append(
            f"| {name} | {kind} | {size} px | {p.params / 1e6:.2f} | {p.active_params / 1e6:.2f} | {p.flops / 1e9:.3f} |"
        )
    return "\n".join(rows)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (callers, tests among them, replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """One stderr handler, message only; levels as in the module docstring. Safe to call again."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    # libraries log at INFO by the hundred (e.g. ONNX's optimiser, one line per folded initialiser)
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("mobile_vmoe").setLevel(logging.DEBUG if verbose else logging.INFO)
    # torch logs through its own handler (not the root's), at WARNING: deprecation notes from its internals
    logging.getLogger("torch").setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.captureWarnings(True)  # library warnings go through logging: shown with -v only
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items`` with a tqdm bar on a terminal; elsewhere (a log file) a plain line every 30 s of a long loop."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False)
        return
    last = time.monotonic()
    for i, item in enumerate(items, start=1):
        yield item
        if time.monotonic() - last >= PROGRESS_LOG_SECONDS:
            log.info("%s: %d/%d", desc, i, total)
            last = time.monotonic()


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
    verbose = {"action": "store_true", "help": "details: debug lines and other libraries' logs and warnings"}
    parser.add_argument("-v", "--verbose", **verbose)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in STAGES.values():
        importlib.import_module(module).add_cli(sub)
    # -v also after the verb; SUPPRESS: when absent there, the global flag's value stays
    for p in sub.choices.values():
        try:
            p.add_argument("-v", "--verbose", **{**verbose, "default": argparse.SUPPRESS})
        except argparse.ArgumentError:
            pass  # the verb has a -v of its own
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"mobile-vmoe {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
