"""`mobile-vmoe bench FILE`: latency of a ``.pte`` (ExecuTorch), ``.onnx`` (ONNX Runtime) or checkpoint (eager
torch) on this host, as one bench result document (``schema.py``).

Three steps: read and check every input (model file, sidecar, images, the preprocessing), measure in a child
process (``runtime.py``), assemble the document. Images are preprocessed as the model was evaluated: the
``Preprocess`` of the export sidecar (what the phone harnesses apply too), else the model file's.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..common import UserError, store_paths, write_json_atomic
from ..files.sidecar import Sidecar, find_sidecar
from ..preprocess import Preprocess
from .runtime import Measurement, MeasureSpec, host_device, measure, probe_model, version_of
from .schema import RESULT_PATHS, SCHEMA_VERSION, expert_latency, latency_stats, validate_result

__all__ = ["bench", "list_images", "load_images", "model_format"]

FORMATS = {".pte": "pte", ".onnx": "onnx", ".safetensors": "safetensors", ".mlpackage": "mlpackage"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BACKENDS = {"onnx": "CPUExecutionProvider", "safetensors": "cpu"}


# ---------------------------------------------------------------------------------------------------------------
# Model files, sidecars, images (shared with the phone drivers)
# ---------------------------------------------------------------------------------------------------------------


def model_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported model file (expected one of {', '.join(FORMATS)})")
    return fmt


def check_counts(warmup: int, iterations: int, threads: int | None = None) -> None:
    if warmup < 0 or iterations < 1:
        raise UserError(f"--warmup must be >= 0 and --iterations >= 1 (got {warmup}, {iterations})")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")


def checked_sidecar(path: Path) -> tuple[Path | None, Sidecar | None]:
    """The artifact's sidecar, refused if it describes another file (size and sha256 recorded at export)."""
    sidecar_path, sidecar = find_sidecar(path)
    if sidecar is not None:
        sidecar.check_artifact(path, sidecar_path)
    return sidecar_path, sidecar


def size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    size = path.stat().st_size
    if path.suffix == ".onnx":  # external data written beside the graph
        size += sum(f.stat().st_size for f in path.parent.glob(path.name + ".data") if f.is_file())
    return size


def routing_of(sidecar: Sidecar | None, model: Any = None) -> dict[str, int] | None:
    if model is not None and getattr(model, "is_moe", False):
        return {"E": int(model.num_experts), "K": int(model.top_k), "L": int(model.num_moe_layers)}
    r = sidecar.routing if sidecar is not None else None
    if isinstance(r, dict) and all(isinstance(r.get(k), int) for k in "EKL"):
        return {k: int(r[k]) for k in "EKL"}
    return None


def sidecar_checkpoint(sidecar: Sidecar | None, sidecar_path: Path | None) -> Path | None:
    """The eager checkpoint the export came from, if the sidecar records one and it still exists."""
    if sidecar is None or sidecar.checkpoint is None:
        return None
    p = Path(sidecar.checkpoint)
    if not p.is_absolute() and sidecar_path is not None and not p.exists():
        p = sidecar_path.parent / p
    return p if p.exists() else None


def list_images(images: str | os.PathLike[str]) -> list[Path]:
    """An ImageFolder directory (any depth) or a flat directory of images, in sorted order."""
    d = Path(images)
    if not d.is_dir():
        raise UserError(f"--images: not a directory: {d}")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {d}")
    return files


def load_images(files: Sequence[str | os.PathLike[str]], pre: Preprocess) -> list[np.ndarray]:
    """Decode and preprocess as the model was evaluated; each array is [1, 3, size, size] float32."""
    from PIL import Image, UnidentifiedImageError

    tf = pre.transform()
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(tf(im).numpy()[None].astype(np.float32))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise UserError(f"{f}: not a readable image ({e})") from None
    return out


def sample_tokens(path: Path, sidecar: Sidecar) -> list[list[int]]:
    """A text encoder's input: ``SAMPLE_CAPTIONS`` through the tokenizer its sidecar names, [N][L] ids."""
    from ..text import SAMPLE_CAPTIONS, Tokenizer

    text = sidecar.text
    assert text is not None  # read_sidecar requires it of a text encoder
    if text.tokenizer != "openai-clip-bpe":
        raise UserError(
            f"{path}: its sidecar names tokenizer {text.tokenizer!r}; this bench has openai-clip-bpe"
        )
    return Tokenizer(text.context_length)(SAMPLE_CAPTIONS).tokens.tolist()


def check_image_input(path: Path, shape: Sequence[int], pre: Preprocess, pre_source: str) -> None:
    """Images become [1, 3, size, size]: refuse a model whose input is anything else, before any work."""
    want = [1, 3, pre.size, pre.size]
    if len(shape) != 4 or list(shape[1:]) != want[1:]:
        raise UserError(
            f"{path}: its input is {list(shape)}, but --images are preprocessed to {want} ({pre_source}): "
            f"this model does not take these images; bench it without --images, or give its own sidecar"
        )


def per_expert_latency(
    samples_ms: Sequence[float],
    image_files: Sequence[Path],
    pre: Preprocess,
    eager: Any,
    notes: list[str],
) -> dict[str, dict[str, float | int]] | None:
    """Samples grouped by the expert the eager router picks for the image of each iteration (image i mod N);
    None, with the reason in ``notes``, where that cannot be known."""
    if not image_files:
        notes.append("latency_per_expert: null (no --images given)")
        return None
    if eager is None:
        notes.append(
            "latency_per_expert: null (no eager checkpoint to compute routing: the sidecar names none "
            "or it does not exist)"
        )
        return None
    if not getattr(eager, "is_moe", False):
        notes.append("latency_per_expert: null (dense model)")
        return None
    if getattr(eager, "moe_routing", None) == "token":
        notes.append("latency_per_expert: null (per-token routing: every image runs several experts)")
        return None
    size = Preprocess.for_model(eager).size
    if size != pre.size:
        notes.append(
            f"latency_per_expert: null (the eager checkpoint takes {size} px images, the benchmarked model "
            f"{pre.size} px: it is not the checkpoint this model was exported from)"
        )
        return None
    experts = _route_images(eager, load_images(image_files, pre))
    return expert_latency(samples_ms, [experts[i % len(experts)] for i in range(len(samples_ms))])


def _route_images(model: Any, images: Sequence[np.ndarray]) -> list[int]:
    """The first routed expert (expert_idx[:, 0]) of each image, from the eager model."""
    import torch

    out: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(np.concatenate(images[i : i + 64]))
            _, routing = model.forward_with_routing(x)
            out.extend(int(e) for e in routing.expert_idx[:, 0])
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# The host benchmark
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class HostInputs:
    """Everything ``bench`` needs, read and checked before any measurement."""

    path: Path
    fmt: str  # pte | onnx | safetensors
    sidecar: Sidecar | None
    shape: list[int]  # the model's input, [1, 3, H, W]
    delegates: list[str]
    pre: Preprocess
    image_files: list[Path]
    images_dir: str | None
    tokens: list[list[int]] = field(default_factory=list)  # a text encoder's input rows (sample captions)
    eager: Any = None  # the eager model, for routing (None where unknown or not needed)
    model_name: str | None = None
    notes: list[str] = field(default_factory=list)


def _read_inputs(
    model_file: str | os.PathLike[str],
    warmup: int,
    iterations: int,
    threads: int | None,
    images: str | os.PathLike[str] | None,
) -> HostInputs:
    path = Path(model_file)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    fmt = model_format(path)
    if fmt == "mlpackage":
        raise UserError(
            f"{path}: Core ML packages run on Apple devices: use `mobile-vmoe bench --target ios`"
        )
    check_counts(warmup, iterations, threads)
    notes: list[str] = []
    sidecar_path, sidecar = (None, None) if fmt == "safetensors" else checked_sidecar(path)
    if fmt != "safetensors" and sidecar is None:
        notes.append(f"no export sidecar found beside {path.name} ({path.name}.json)")
    image_files = list_images(images)[:iterations] if images is not None else []

    # Eager model: the input itself, or the checkpoint the export came from (for routing per image).
    ckpt = path if fmt == "safetensors" else sidecar_checkpoint(sidecar, sidecar_path)
    eager, meta = None, None
    if ckpt is not None and (fmt == "safetensors" or image_files):
        from ..checkpoint import load_model

        eager, meta = load_model(ckpt)
        if fmt == "safetensors" and getattr(eager, "is_image_text", False):
            raise UserError(
                f"{path}: an image-text model takes images and captions together; export its zero-shot "
                "classifier or text encoder (`mobile-vmoe export --part image|text`) and bench that"
            )

    if fmt == "safetensors":
        pre, pre_source = meta.preprocess, f"from the model file {path}"
        shape, delegates = [1, 3, pre.size, pre.size], []
    else:
        if sidecar is not None and sidecar.sha256:
            # the export this sidecar describes (sha256 checked) has the input it records: one child process
            # per file is spared, and the measuring child lists the delegates
            shape, delegates = sidecar.input_shape, []
        else:
            shape, delegates = probe_model(path, fmt)  # opens the untrusted file in a child process
        if sidecar is not None:
            pre, pre_source = sidecar.preprocess, f"from its sidecar {sidecar_path}"
        else:
            pre = Preprocess(size=int(shape[-1]), resize=int(shape[-1]))
            pre_source = "resized to its input size: no sidecar"
    tokens = sample_tokens(path, sidecar) if sidecar is not None and sidecar.takes_tokens else []
    if image_files:
        if tokens:
            raise UserError(f"{path}: a text encoder takes tokens, not images: bench it without --images")
        check_image_input(path, shape, pre, pre_source)
    return HostInputs(
        path=path,
        fmt=fmt,
        sidecar=sidecar,
        shape=[int(s) for s in shape],
        delegates=delegates,
        pre=pre,
        image_files=image_files,
        images_dir=str(images) if image_files else None,
        tokens=tokens,
        eager=eager,
        model_name=(meta.model if meta is not None else None) or (sidecar.model if sidecar else None),
        notes=notes,
    )


def _document(inp: HostInputs, m: Measurement, warmup: int, iterations: int, isolate: bool) -> dict[str, Any]:
    """The bench result (schema 1.0) of a host run."""
    notes = [*inp.notes, *m.notes]
    if not isolate:
        notes.append(
            "measured in the calling process: peak memory includes whatever that process held before"
        )
    per_expert = per_expert_latency(m.samples_ms, inp.image_files, inp.pre, inp.eager, notes)
    sidecar = inp.sidecar
    precision = "fp32" if inp.fmt == "safetensors" else (sidecar.precision if sidecar is not None else None)
    delegates = inp.delegates or m.delegates
    backend = BACKENDS.get(inp.fmt) or ("xnnpack" if "XnnpackBackend" in delegates else "portable")
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": now_iso(),
        "harness": {
            "name": "mobile-vmoe-host",
            "version": version_of("mobile-vmoe"),
            "isolated_process": isolate,
        },
        "device": host_device(),
        "runtime": m.runtime,
        "backend": {
            "name": backend,
            "compute_units": None,
            "threads": m.threads,
            "delegates": delegates,
            "compute_plan": None,
        },
        "model": {
            "path": str(inp.path),
            "format": inp.fmt,
            "size_bytes": size_bytes(inp.path),
            "name": inp.model_name,
            "sidecar": sidecar.to_dict() if sidecar is not None else None,
            "routing": routing_of(sidecar, inp.eager),
        },
        "precision": precision,
        "input": {
            "shape": inp.shape,
            "dtype": "int64" if inp.tokens else "float32",
            "source": "images" if inp.image_files else "tokens" if inp.tokens else "random",
            "images": {"dir": inp.images_dir, "count": len(inp.image_files)} if inp.image_files else None,
            "preprocess": inp.pre.to_dict() if inp.image_files else None,
        },
        "warmup_iterations": int(warmup),
        "timed_iterations": int(iterations),
        "cold_load_ms": m.cold_load_ms,
        "load_breakdown_ms": m.load_breakdown_ms,
        "first_inference_ms": m.first_inference_ms,
        "samples_ms": m.samples_ms,
        "stats": latency_stats(m.samples_ms),
        "memory": m.memory,
        "thermal_before": m.thermal_before,
        "thermal_after": m.thermal_after,
        "latency_per_expert": per_expert,
        "notes": notes,
    }


def bench(
    model_file: str | os.PathLike[str],
    *,
    warmup: int = 10,
    iterations: int = 50,
    threads: int | None = None,
    images: str | os.PathLike[str] | None = None,
    json_out: str | os.PathLike[str] | None = None,
    isolate: bool = True,
) -> dict[str, Any]:
    """Benchmark FILE.pte (ExecuTorch), FILE.onnx (ONNX Runtime) or CKPT.safetensors (eager torch) on this host.

    Defaults: 10 warm-up and 50 timed runs (as ExecuTorch's Android benchmark app and TFLite's benchmark_model).
    With ``images``, iteration i runs on image i mod N, and for a MoE whose eager checkpoint is known (the input
    itself, or the sidecar's "checkpoint") the samples are grouped by the expert the router picks for each image.
    ``isolate=False`` measures in this process (a file without a sidecar is still probed in a child first).
    Returns the schema document; writes it atomically to ``json_out`` if given.
    """
    inp = _read_inputs(model_file, warmup, iterations, threads, images)
    spec = MeasureSpec(
        format=inp.fmt,
        path=str(inp.path),
        shape=inp.shape,
        warmup=int(warmup),
        iterations=int(iterations),
        threads=threads,
        images=[str(f) for f in inp.image_files],
        tokens=inp.tokens,
        preprocess=inp.pre.to_dict() if inp.image_files else None,
    )
    m = measure(spec, isolate=isolate, desc=f"bench {inp.path.name}")
    doc = _document(inp, m, warmup, iterations, isolate)
    validate_result(doc, "host result")
    if json_out is not None:
        write_json_atomic(json_out, store_paths(doc, json_out, RESULT_PATHS))
    return doc
