"""Model weights on disk: the contract between stages.

A model file is a ``.safetensors`` file whose string metadata says how to rebuild the model:
    format        "mobile-vmoe/1"
    model         timm model name, e.g. "mobile_vmoe_tiny_patch4_32"
    model_kwargs  JSON object passed to timm.create_model (num_classes, num_experts, top_k, ...)
    class_names   JSON list of C class names (index order = logit order)
    extra         JSON object with anything else a stage wants to record (data dir, held-out list, config, ...)
Nothing is unpickled: weights come from safetensors, metadata from JSON.

``load_model`` accepts such a file, or a run directory holding ``model.safetensors`` (written by training).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .common import UserError, atomic_path

FORMAT = "mobile-vmoe/1"
MODEL_FILE = "model.safetensors"


@dataclass
class ModelMeta:
    model: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "model": self.model,
            "model_kwargs": json.dumps(self.model_kwargs),
            "class_names": json.dumps(self.class_names),
            "extra": json.dumps(self.extra, default=str),
        }


def save_model(path: str | os.PathLike[str], model: torch.nn.Module, meta: ModelMeta) -> Path:
    """Write weights + metadata atomically (temporary file, then rename)."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta.to_strings())
    return path


def resolve_model_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise UserError(
            f"checkpoint not found: {path} (expected a .safetensors model file or a run directory "
            f"holding {MODEL_FILE})"
        )
    return p


def read_meta(path: str | os.PathLike[str]) -> ModelMeta:
    p = resolve_model_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable safetensors file ({e})") from None
    if md.get("format") != FORMAT:
        raise UserError(
            f"{p}: not a mobile-vmoe model file (metadata 'format' is {md.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        return ModelMeta(
            model=md["model"],
            model_kwargs=json.loads(md.get("model_kwargs", "{}")),
            class_names=json.loads(md.get("class_names", "[]")),
            extra=json.loads(md.get("extra", "{}")),
        )
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: metadata field is missing or not JSON ({e})") from None


def load_model(
    path: str | os.PathLike[str], expect_moe: bool | None = None, map_location: str = "cpu"
) -> tuple[torch.nn.Module, ModelMeta]:
    """Rebuild the model named in the file's metadata and load its weights (eval mode)."""
    import mobile_vmoe.models  # noqa: F401  (registers the model names)

    p = resolve_model_file(path)
    meta = read_meta(p)
    if meta.model not in timm.list_models("mobile_v*"):
        raise UserError(f"{p}: model {meta.model!r} is not a registered mobile-vmoe model")
    model = timm.create_model(meta.model, **meta.model_kwargs)
    if expect_moe is not None and bool(getattr(model, "is_moe", False)) != expect_moe:
        raise UserError(
            f"{p}: holds {meta.model} ({'MoE' if not expect_moe else 'dense'}), "
            f"expected a {'MoE' if expect_moe else 'dense'} model"
        )
    from safetensors.torch import load_file

    state = load_file(str(p), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{p}: weights do not match {meta.model} with {meta.model_kwargs} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), meta
