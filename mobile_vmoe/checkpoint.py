"""Model weights on disk: the contract between stages.

A model file is a ``.safetensors`` file whose string metadata says how to rebuild the model:
    format        "mobile-vmoe/2" ("mobile-vmoe/1" files are still read)
    model         timm model name, e.g. "mobile_vmoe_tiny_patch4_32"
    model_kwargs  JSON object passed to timm.create_model (num_classes, num_experts, top_k, ...)
    class_names   JSON list of C class names (index order = logit order)
    preprocess    JSON Preprocess record (mobile_vmoe.preprocess): what every later stage does to an image
    train         JSON TrainInfo: where the weights came from (dataset, held-out list, super-classes, ...)
    prompt_templates  JSON list of zero-shot prompt templates ("a photo of the {}."), image-text models only
Nothing is unpickled: weights come from safetensors, metadata from JSON.

Paths in ``train`` (dataset, held-out list, super-classes, init weights) that lie inside the directory moving
with the file (the run directory, or the pipeline directory holding it) are stored relative to the model file's
folder, so a moved or copied run or pipeline directory keeps pointing at its own files (common.store_path);
others (a user's dataset elsewhere) stay absolute.

``load_model`` accepts such a file, or a run directory holding ``model.safetensors`` (written by training).
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .common import UserError, atomic_path, load_path, move_root, store_path
from .preprocess import Preprocess

FORMAT = "mobile-vmoe/2"
_READABLE = ("mobile-vmoe/1", FORMAT)
MODEL_FILE = "model.safetensors"
_PATHS = ("data_dir", "heldout_list", "superclasses", "init_from")  # the TrainInfo fields holding paths


@dataclass
class TrainInfo:
    """Where a model's weights came from. Paths are absolute in memory."""

    data_dir: str | None = None  # the dataset directory it was trained on
    heldout_list: str | None = None  # RUN/heldout.txt: the images training never saw
    superclasses: str | None = None  # the superclasses.json its router was trained against
    init_from: str | None = None  # the weights it started from (train --init-from)
    ema: bool = False  # the weights are the EMA's
    step: int = 0  # optimizer steps taken


@dataclass
class ModelMeta:
    model: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    preprocess: Preprocess
    train: TrainInfo = field(default_factory=TrainInfo)
    prompt_templates: list[str] = field(
        default_factory=list
    )  # image-text: class_names fill them for zero-shot

    def to_strings(self, file: Path, root: Path) -> dict[str, str]:
        """The file's string metadata; ``root``: the directory that moves with ``file``."""
        train = asdict(self.train)
        for k in _PATHS:
            if train[k]:
                # the held-out list is its run directory's own file (RUN/heldout.txt): it always moves with it
                within = Path(train[k]).parent if k == "heldout_list" else root
                train[k] = store_path(train[k], file.parent, within)
        out = {
            "format": FORMAT,
            "model": self.model,
            "model_kwargs": json.dumps(self.model_kwargs),
            "class_names": json.dumps(self.class_names),
            "preprocess": json.dumps(self.preprocess.to_dict()),
            "train": json.dumps(train),
        }
        if self.prompt_templates:
            out["prompt_templates"] = json.dumps(self.prompt_templates)
        return out


def save_model(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    meta: ModelMeta,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write weights + metadata atomically (temporary file, then rename). ``root``: the directory that moves with
    the file (paths inside it are stored relative); default ``move_root`` of its folder."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta.to_strings(path, Path(root or move_root(path.parent))))
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


def _train_info(obj: Any, p: Path) -> TrainInfo:
    if not isinstance(obj, dict):
        raise UserError(f"{p}: metadata 'train' must be a JSON object, got {obj!r}")
    known = {f.name: f.type for f in fields(TrainInfo)}
    vals = {k: v for k, v in obj.items() if k in known}
    for k, v in vals.items():
        ok = v is None or (
            isinstance(v, bool) if k == "ema" else isinstance(v, int) if k == "step" else isinstance(v, str)
        )
        if not ok:
            raise UserError(f"{p}: metadata train.{k} has the wrong type ({v!r})")
    info = TrainInfo(**{k: v for k, v in vals.items() if v is not None})
    for k in _PATHS:  # absolute in memory (older files hold absolute paths but the held-out list)
        if getattr(info, k):
            setattr(info, k, str(load_path(getattr(info, k), p.parent)))
    return info


def _legacy(extra: dict[str, Any], model: str, p: Path) -> tuple[Preprocess, TrainInfo]:
    """mobile-vmoe/1 kept preprocessing and provenance in an untyped 'extra' object."""

    cfg = timm.get_pretrained_cfg(model)
    cfg = cfg.to_dict() if cfg is not None else {}
    size = int(extra.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1])
    pct = float(extra.get("crop_pct") or cfg.get("crop_pct", 1.0))
    pre = Preprocess.from_dict(
        {
            "size": size,
            "resize": max(size, int(size / pct)),
            "interpolation": extra.get("interpolation") or cfg.get("interpolation", "bicubic"),
            "mean": extra.get("mean") or cfg.get("mean"),
            "std": extra.get("std") or cfg.get("std"),
        },
        f"{p}: metadata extra (mean, std, image_size, crop_pct, interpolation)",
    )
    keys = ("data_dir", "heldout_list", "superclasses", "ema", "step")
    return pre, _train_info({k: extra[k] for k in keys if k in extra}, p)


def read_meta(path: str | os.PathLike[str]) -> ModelMeta:
    p = resolve_model_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable safetensors file ({e})") from None
    if md.get("format") not in _READABLE:
        raise UserError(
            f"{p}: not a mobile-vmoe model file (metadata 'format' is {md.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        model = md["model"]
        kwargs = json.loads(md.get("model_kwargs", "{}"))
        names = json.loads(md.get("class_names", "[]"))
        templates = json.loads(md.get("prompt_templates", "[]"))
        if md["format"] == "mobile-vmoe/1":
            pre, train = _legacy(json.loads(md.get("extra", "{}")), model, p)
        else:
            pre = Preprocess.from_dict(json.loads(md["preprocess"]), f"{p}: metadata 'preprocess'")
            train = _train_info(json.loads(md.get("train", "{}")), p)
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: metadata field is missing or not JSON ({e})") from None
    if (
        not isinstance(kwargs, dict)
        or not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
    ):
        raise UserError(f"{p}: metadata 'model_kwargs' must be an object and 'class_names' a list of strings")
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise UserError(f"{p}: metadata 'prompt_templates' must be a list of strings with one '{{}}' each")
    return ModelMeta(model=model, model_kwargs=kwargs, class_names=names, preprocess=pre, train=train,
                     prompt_templates=templates)  # fmt: skip


def create_model(meta: ModelMeta, where: str | os.PathLike[str], **overrides: Any) -> torch.nn.Module:
    """timm.create_model from metadata; a kwarg of the wrong type or value is a UserError naming the file."""
    from mobile_vmoe.models.names import project_models  # importing the package registers the names

    if meta.model not in project_models():
        raise UserError(f"{where}: model {meta.model!r} is not a registered mobile-vmoe model")
    try:
        return timm.create_model(meta.model, **{**meta.model_kwargs, **overrides})
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(
            f"{where}: metadata model_kwargs {meta.model_kwargs} do not build {meta.model}: {e}"
        ) from None


def load_model(
    path: str | os.PathLike[str], expect_moe: bool | None = None, map_location: str = "cpu"
) -> tuple[torch.nn.Module, ModelMeta]:
    """Rebuild the model named in the file's metadata and load its weights (eval mode)."""
    from safetensors.torch import load_file

    p = resolve_model_file(path)
    meta = read_meta(p)
    model = create_model(meta, p)
    if expect_moe is not None and bool(getattr(model, "is_moe", False)) != expect_moe:
        raise UserError(
            f"{p}: holds {meta.model} ({'MoE' if not expect_moe else 'dense'}), "
            f"expected a {'MoE' if expect_moe else 'dense'} model"
        )
    try:
        state = load_file(str(p), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{p}: weights cannot be read ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"{p}: weights do not match {meta.model} with {meta.model_kwargs} ({e})") from None
    if missing or unexpected:
        raise UserError(
            f"{p}: weights do not match {meta.model} with {meta.model_kwargs} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), meta
