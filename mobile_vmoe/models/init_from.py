"""Initialise a model from weights the user has: a mobile-vmoe model file or run directory, or a state dict.

    missing = init_from(model, "runs/dense")               # dense run -> dense model, or upcycled into a MoE
    missing = init_from(model, "vit_tiny.safetensors")     # timm ViT names (blocks.N.mlp.fc1.weight, ...)

A dense state dict loaded into a MoE is upcycled: every expert of a MoE block starts as that block's dense MLP,
and the router keeps its fresh initialisation.
"""

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import resolve_model_file
from ..common import UserError
from .vit import remap_state_dict

__all__ = ["init_from"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_SHOW = 5  # keys listed per kind of mismatch


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling refusal or a corrupt file: either way the user's input
            raise UserError(f"{path}: not a readable weights-only torch file ({e})") from None
        # training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    else:
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict (tensor names -> tensors)")
    return state


def _listing(what: str, names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return f"{len(names)} {what}: {', '.join(names[:_SHOW])}{more}"


def init_from(model: nn.Module, path: str | os.PathLike[str], *, reset_head: bool = False) -> list[str]:
    """Load the weights at ``path`` into ``model``; return the names left at their fresh initialisation.

    ``path``: a mobile-vmoe model file, a run directory holding one, a ``.safetensors`` state dict, or a
    ``.pth`` / ``.pt`` / ``.bin`` state dict (read with ``torch.load(weights_only=True)``). A dense state dict
    loaded into a MoE is upcycled (each expert = the dense MLP; the router stays fresh). A classifier head of a
    different number of classes is refused unless ``reset_head=True``, which keeps the model's fresh head.
    Anything else that does not match raises ``UserError`` naming the file and the keys.
    """
    p = Path(path)
    if p.is_dir():
        p = resolve_model_file(p)
    elif not p.is_file():
        raise UserError(f"weights not found: {path}")
    source = _read_state(p)
    upcycled = bool(getattr(model, "moe_blocks", None)) and not any(
        k.startswith("moe_blocks.") for k in source
    )
    state = remap_state_dict(source, model) if hasattr(model, "moe_blocks") else dict(source)
    own = model.state_dict()

    fresh: list[str] = []
    head = [k for k in own if k.startswith("head.")]
    theirs = state["head.weight"].shape[0] if "head.weight" in state else None
    ours = own["head.weight"].shape[0] if "head.weight" in own else None
    if theirs is not None and ours is not None and theirs != ours:
        if not reset_head:
            raise UserError(
                f"{p}: its classifier head has {theirs} classes, the model {ours}; "
                "pass reset_head=True to keep the model's fresh head"
            )
        for k in head:
            state.pop(k, None)
        fresh += head

    # a dense source has no router: upcycling leaves it fresh
    allowed = ("router.",) if upcycled else ()
    missing = [k for k in own if k not in state and k not in fresh]
    unexplained = [k for k in missing if not k.startswith(allowed)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if unexplained or unexpected or shapes:
        parts = [
            _listing(what, names)
            for what, names in (
                ("missing", unexplained),
                ("unexpected", unexpected),
                ("shape mismatches (file vs model)", shapes),
            )
            if names
        ]
        raise UserError(f"{p}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return fresh + missing
