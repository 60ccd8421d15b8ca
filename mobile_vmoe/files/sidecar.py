"""Export sidecars, ``FILE.<ext>.json`` beside each ``.pte`` / ``.onnx`` / ``.mlpackage``.

What other stages and the phone harnesses read is typed here; the verification report (parity, delegation,
quantization, Core ML structure, versions, timings) is kept as ``details`` for people and the report.

    format            "pte" | "onnx" | "coreml"
    artifact          the artifact's file name
    sha256, file_size_bytes   what the artifact was when exported: bench refuses an artifact that differs
    model, model_kwargs       timm name and kwargs of the exported model
    checkpoint        the eager model file it came from (null for random weights): relative to the sidecar's
                      folder when inside the directory moving with it (the export folder, or the pipeline
                      directory holding it: common.store_path), else absolute; absolute in memory
    checkpoint_sha256 the sha256 of that model file when exported: a pipeline re-exports an artifact whose model
                      file has changed since (a retrained stage) instead of keeping it
    kind              "classifier" (image -> logits [1, C]), "zero_shot_classifier" (an image-text model's image
                      path with its class-prompt embeddings baked in: image -> logits [1, C]) or "text_encoder"
                      (an image-text model's text path: tokens -> normalised embedding [1, P])
    class_names       [C] (a text encoder: the checkpoint's, for reference)
    input_shape       [1, 3, H, W]; a text encoder: [1, L]
    input_dtype       "float32" (images); "int64" (a text encoder's tokens)
    text              a text encoder's input (TextInput): tokenizer "openai-clip-bpe", context_length L,
                      pad_id, sot_id, eot_id, vocab_size; null otherwise
    prompt_templates  zero-shot classifier: the templates its class embeddings average over ("a photo of the {}.")
    embed_dim         image-text models: P, the joint embedding width
    logit_scale       image-text models: the learned temperature (logits = logit_scale * cosine)
    preprocess        the model file's Preprocess (mobile_vmoe.preprocess): what an app must do to an image
    routing           {E, K, L, ...} for a MoE, null for a dense model (mobile_vmoe.bench.schema's keys)
    precision         "fp32", "int8", "fp16", ...
    expert_dispatch   "switch" | "gather" | null, and expert_dispatch_reason
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..common import UserError, load_paths, read_json, store_paths, write_json_atomic
from ..preprocess import Preprocess

__all__ = [
    "KINDS",
    "Sidecar",
    "TextInput",
    "artifact_digest",
    "find_sidecar",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]

VERSION = 2
_TYPED = (
    "sidecar_version", "format", "artifact", "sha256", "file_size_bytes", "model", "model_kwargs", "checkpoint",
    "checkpoint_sha256", "random_weights", "kind", "class_names", "input_shape", "input_dtype", "preprocess", "text", "prompt_templates",
    "embed_dim", "logit_scale", "routing", "precision", "expert_dispatch", "expert_dispatch_reason",
)  # fmt: skip
# what a sidecar stores relative to its folder when inside the directory moving with it (common.store_paths)
PATHS = ("checkpoint", "images.data_dir", "images.heldout_list")
KINDS = ("classifier", "zero_shot_classifier", "text_encoder")
INPUT_DTYPES = {"classifier": "float32", "zero_shot_classifier": "float32", "text_encoder": "int64"}


@dataclass
class TextInput:
    """What an app feeds a text encoder: its captions through ``tokenizer``, [SOT, ids..., EOT] padded with
    ``pad_id`` to ``context_length`` (cut to end in EOT when longer), as int64 [1, L]."""

    tokenizer: str  # "openai-clip-bpe": open_clip's SimpleTokenizer (CLIP's lower-cased byte-level BPE)
    context_length: int
    pad_id: int
    sot_id: int
    eot_id: int
    vocab_size: int

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> TextInput:
        names = [f.name for f in fields(cls)]
        if not isinstance(obj, dict) or not all(k in obj for k in names):
            raise UserError(f"{where}: field 'text' must be an object with {', '.join(names)}; got {obj!r}")
        if not isinstance(obj["tokenizer"], str) or not all(
            isinstance(obj[k], int) and obj[k] >= 0 for k in names[1:]
        ):
            raise UserError(f"{where}: field 'text' has a value of the wrong type ({obj!r})")
        return cls(**{k: obj[k] for k in names})


@dataclass
class Sidecar:
    format: str
    artifact: str
    model: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    input_shape: list[int]
    preprocess: Preprocess
    precision: str
    routing: dict[str, Any] | None = None
    kind: str = "classifier"
    input_dtype: str = "float32"
    text: TextInput | None = None
    prompt_templates: list[str] = field(default_factory=list)
    embed_dim: int | None = None
    logit_scale: float | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    random_weights: bool = False
    expert_dispatch: str | None = None
    expert_dispatch_reason: str | None = None
    sha256: str | None = None
    file_size_bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.routing is not None

    @property
    def takes_tokens(self) -> bool:
        """A text encoder: its input is int64 tokens [1, L], not an image."""
        return self.kind == "text_encoder"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sidecar_version": VERSION}
        for k in _TYPED[1:]:
            v = getattr(self, k)
            d[k] = v.to_dict() if isinstance(v, Preprocess) else asdict(v) if isinstance(v, TextInput) else v
        return {**d, **self.details}

    def check_artifact(self, path: str | os.PathLike[str], sidecar_file: str | os.PathLike[str]) -> None:
        """Refuse an artifact that is not the one this sidecar describes (another model copied over it)."""
        if self.sha256 is None:
            return  # written before sidecars recorded a digest
        size, digest = artifact_digest(path)
        if digest != self.sha256 or (self.file_size_bytes is not None and size != self.file_size_bytes):
            raise UserError(
                f"{path}: does not match its sidecar {sidecar_file} (sidecar: {self.file_size_bytes} bytes, "
                f"sha256 {self.sha256[:12]}...; file: {size} bytes, sha256 {digest[:12]}...). Re-export it, "
                f"or remove the stale sidecar"
            )


def sidecar_path(artifact: str | os.PathLike[str]) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def artifact_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size in bytes, sha256) of a file, or of a directory's files in sorted order (an .mlpackage)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h, size = hashlib.sha256(), 0
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return size, h.hexdigest()


def write_sidecar(
    artifact: str | os.PathLike[str], sc: Sidecar, at: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``sc`` for ``artifact`` (digest taken now); ``at`` overrides where (a temporary path)."""
    sc.file_size_bytes, sc.sha256 = artifact_digest(artifact)
    out = Path(at) if at is not None else sidecar_path(artifact)
    write_json_atomic(out, store_paths(sc.to_dict(), sidecar_path(artifact), PATHS))
    return out


def read_sidecar(path: str | os.PathLike[str]) -> Sidecar:
    where = str(path)
    obj = read_json(path, "export sidecar")
    if not isinstance(obj, dict):
        raise UserError(f"{where}: export sidecar must be a JSON object")
    obj = load_paths(obj, path, PATHS)

    def need(key: str, typ: type | tuple[type, ...]) -> Any:
        v = obj.get(key)
        if not isinstance(v, typ):
            raise UserError(f"{where}: field {key!r} must be {getattr(typ, '__name__', typ)}, got {v!r}")
        return v

    fmt = need("format", str)
    kind = obj.get("kind", "classifier")
    if kind not in KINDS:
        raise UserError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    text = TextInput.from_dict(obj.get("text"), where) if kind == "text_encoder" else None
    if "input_shape" in obj:
        shape = need("input_shape", list)
    else:  # sidecar version 1
        shape = (obj.get("input") or {}).get("shape") if isinstance(obj.get("input"), dict) else None
        if not isinstance(shape, list):
            raise UserError(f"{where}: field 'input_shape' (or input.shape) is missing")
    want = "[1, L]" if text is not None else "[1, 3, H, W]"
    if not (
        len(shape) == (2 if text is not None else 4) and all(isinstance(s, int) and s > 0 for s in shape)
    ) or (text is not None and shape[1] != text.context_length):
        raise UserError(f"{where}: field 'input_shape' must be {want}, got {shape!r}")
    templates = obj.get("prompt_templates") or []
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise UserError(f"{where}: field 'prompt_templates' must be a list of strings, got {templates!r}")
    pre = obj.get("preprocess")
    if isinstance(pre, dict) and "size" in pre:
        preprocess = Preprocess.from_dict(pre, f"{where}: field 'preprocess'")
    else:  # version 1 resized straight to the input size
        pre = pre if isinstance(pre, dict) else {}
        preprocess = Preprocess.from_dict(
            {k: v for k, v in {"size": shape[-1], "resize": shape[-1], "mean": pre.get("mean"),
                               "std": pre.get("std")}.items() if v is not None},
            f"{where}: field 'preprocess'",
        )  # fmt: skip
    routing = obj.get("routing")
    if routing is not None and not (isinstance(routing, dict) and all(k in routing for k in ("E", "K", "L"))):
        raise UserError(f"{where}: field 'routing' must be null or an object with E, K, L; got {routing!r}")
    size, ckpt = obj.get("file_size_bytes"), obj.get("checkpoint")
    return Sidecar(
        format=fmt,
        artifact=str(obj.get("artifact") or Path(where).name.removesuffix(".json")),
        model=str(obj.get("model") or ""),
        model_kwargs=dict(obj.get("model_kwargs") or {}),
        class_names=[str(c) for c in obj.get("class_names") or []],
        input_shape=[int(s) for s in shape],
        preprocess=preprocess,
        precision=str(obj.get("precision") or "fp32"),
        routing=routing,
        kind=kind,
        input_dtype=INPUT_DTYPES[kind],
        text=text,
        prompt_templates=list(templates),
        embed_dim=obj["embed_dim"] if isinstance(obj.get("embed_dim"), int) else None,
        logit_scale=float(obj["logit_scale"]) if isinstance(obj.get("logit_scale"), (int, float)) else None,
        checkpoint=ckpt if isinstance(ckpt, str) and ckpt else None,
        checkpoint_sha256=obj.get("checkpoint_sha256")
        if isinstance(obj.get("checkpoint_sha256"), str)
        else None,
        random_weights=bool(obj.get("random_weights", False)),
        expert_dispatch=obj.get("expert_dispatch"),
        expert_dispatch_reason=obj.get("expert_dispatch_reason"),
        sha256=obj.get("sha256") if isinstance(obj.get("sha256"), str) else None,
        file_size_bytes=int(size) if isinstance(size, int) else None,
        details={k: v for k, v in obj.items() if k not in _TYPED},
    )


def exported_from(
    artifact: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    digests: dict[Path, str] | None = None,
) -> bool:
    """Whether ``artifact`` is finished (its sidecar written last) and was exported from ``checkpoint`` as it is
    now: a resumed export keeps such files and redoes the others (a model retrained since, an older sidecar).

    ``digests`` (checkpoint -> sha256), shared by the calls of one export stage, hashes each checkpoint once
    for all its artifacts; the caller keeps it no longer than the checkpoints stay unchanged. A checkpoint is
    hashed only when an artifact with a sidecar needs it."""
    side = sidecar_path(artifact)
    if not (Path(artifact).exists() and side.is_file()):
        return False
    sc = read_sidecar(side)
    if sc.checkpoint_sha256 is None:
        return False
    digests = {} if digests is None else digests
    key = Path(checkpoint)
    if key not in digests:
        digests[key] = artifact_digest(key)[1]
    return sc.checkpoint_sha256 == digests[key]


def find_sidecar(artifact: str | os.PathLike[str]) -> tuple[Path | None, Sidecar | None]:
    """The sidecar of ``artifact``: FILE.<ext>.json, else FILE.json; (None, None) when there is none."""
    p = Path(artifact)
    for cand in (sidecar_path(p), p.with_suffix(".json")):
        if cand.is_file():
            return cand, read_sidecar(cand)
    return None, None
