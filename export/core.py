"""``export_model``: one checkpoint (or a named model with random weights) -> a verified mobile artifact + sidecar.

Steps: check the request -> load the model -> clean temporaries a killed export of the same target left ->
load real images (``verify.load_images``) -> lower into a temporary path beside the target (``pte``,
``onnx_export``, ``coreml``) -> verify it there (``verify``; Core ML: ``coreml.check_structure``) -> rename into
place with ``TARGET.json`` (``mobile_vmoe.files.sidecar``). A failed check raises ``VerificationError`` and
leaves nothing at the target.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobile_vmoe.checkpoint import ModelMeta, create_model, load_model, resolve_model_file
from mobile_vmoe.common import UserError, atomic_path
from mobile_vmoe.files.sidecar import Sidecar, artifact_digest, sidecar_path, write_sidecar
from mobile_vmoe.models.token_moe import PRIORITY_FLAGS
from mobile_vmoe.preprocess import Preprocess

from . import coreml, pte
from .image_text import (
    PARTS,
    ImageTextPart,
    TextEncoder,
    caption_images,
    dense_twin,
    describe_part,
    export_part,
    is_image_text,
    text_parity,
    verification_tokens,
)
from .onnx_export import export_onnx
from .quantize import eager_logits, select_fp32_layers
from .quiet import Progress, quiet_libraries
from .summary import print_summary
from .token import for_export as token_for_export
from .token import is_token_moe, token_routing_info
from .verify import (
    Compare,
    Images,
    Thresholds,
    VerificationError,
    load_images,
    parity,
    verify_onnx,
    verify_pte,
)

__all__ = ["DEFAULT_NUM_CALIBRATE", "DEFAULT_NUM_VERIFY", "FORMATS", "VerificationError", "export_model"]

FORMATS: dict[str, str] = {"pte": ".pte", "coreml": ".mlpackage", "onnx": ".onnx"}
DEFAULT_NUM_VERIFY = 500
DEFAULT_NUM_CALIBRATE = 500  # int8-static calibration (training images), int8's layer choice (held-out)
log = logging.getLogger(__name__)
_LIBS = ("torch", "timm", "executorch", "torchao", "coremltools", "onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class Request:
    """What ``export_model`` was asked to make (its keyword arguments of the same names)."""

    fmt: str
    quantize: str | None = None
    num_verify: int = DEFAULT_NUM_VERIFY
    num_calibrate: int = DEFAULT_NUM_CALIBRATE
    atol: float | None = None
    min_top1_agreement: float | None = None
    coreml_input: str = "image"
    coreml_precision: str = "fp16"
    palettize_bits: int | None = None
    expert_dispatch: str | None = None
    capacity_ratio: float | None = (
        None  # per-token V-MoE: inference capacity of the export (None: the model's)
    )
    priority: str | None = None  # per-token V-MoE: a key of PRIORITY_FLAGS (None: the model's)
    part: str | None = None  # image-text: "image" (zero-shot classifier, default) | "text" (text encoder)

    def check(self) -> None:
        """UserError on any bad value, before anything is loaded."""
        fmt, q = self.fmt, self.quantize
        if fmt not in FORMATS:
            raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if q not in (None, *pte.INT8_SCHEMES):
            raise UserError(f"--quantize {q!r}: expected one of {sorted(pte.INT8_SCHEMES)}")
        if q == "int8-static" and fmt != "pte":
            raise UserError(
                "--quantize int8-static is a .pte scheme; coreml takes --quantize int8 (int8 weights)"
            )
        if q and fmt == "onnx":
            raise UserError("--quantize int8 is not supported for onnx here; use pte or coreml")
        if self.coreml_input not in ("image", "tensor") or self.coreml_precision not in ("fp16", "fp32"):
            raise UserError(
                f"Core ML options: input must be image|tensor (got {self.coreml_input!r}), precision fp16|fp32 "
                f"(got {self.coreml_precision!r})"
            )
        bits = self.palettize_bits
        if bits is not None and (fmt != "coreml" or bits not in (1, 2, 3, 4, 6, 8)):
            raise UserError("--palettize-bits applies to coreml only and must be one of 1, 2, 3, 4, 6, 8")
        if bits is not None and q:
            raise UserError("--palettize-bits and --quantize int8 are two weight compressions: pick one")
        if self.capacity_ratio is not None and not self.capacity_ratio > 0:
            raise UserError(f"--capacity-ratio must be > 0, got {self.capacity_ratio}")
        if self.priority not in (None, *PRIORITY_FLAGS):
            raise UserError(f"--priority {self.priority!r}: expected one of {', '.join(PRIORITY_FLAGS)}")
        if self.expert_dispatch not in (None, "switch", "gather"):
            raise UserError(f"--expert-dispatch {self.expert_dispatch!r}: expected switch or gather")
        if self.expert_dispatch == "switch" and fmt == "coreml":
            raise UserError(
                "--expert-dispatch switch is for pte and onnx; Core ML gathers the expert weights"
            )
        if self.part not in (None, *PARTS):
            raise UserError(f"--part {self.part!r}: expected one of {', '.join(PARTS)}")
        if self.part == "text" and q == "int8-static":
            raise UserError(
                "--quantize int8-static calibrates on images; a text encoder takes --quantize int8"
            )
        if self.num_verify < 1:
            raise UserError(f"num_verify must be >= 1, got {self.num_verify}")
        if self.atol is not None and self.atol < 0:
            raise UserError(f"atol must be >= 0, got {self.atol}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise UserError(f"min_top1_agreement must be >= 0 and <= 1, got {self.min_top1_agreement}")

    @property
    def precision(self) -> str:
        """The sidecar's precision: fp32, int8, fp16, fp16+int8-weights, fp16+palettized4, ..."""
        if self.quantize:
            p = "int8" if self.fmt == "pte" else f"{self.coreml_precision}+int8-weights"
        else:
            p = self.coreml_precision if self.fmt == "coreml" else "fp32"
        return p + (f"+palettized{self.palettize_bits}" if self.palettize_bits else "")

    @property
    def needs_calibration(self) -> bool:
        return self.quantize == "int8-static"


@dataclass
class _Job:
    """One export under way: the eager model, its images and eager logits, and the records being filled."""

    req: Request
    net: nn.Module
    meta: ModelMeta
    images: Images
    ref: torch.Tensor  # eager logits of images.verify
    thr: Thresholds
    sidecar: Sidecar
    report: dict[str, Any] = field(default_factory=dict)  # the verification report (sidecar details)


def export_model(
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    quantize: str | None = None,
    data: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] = "data",
    num_verify: int = DEFAULT_NUM_VERIFY,
    num_calibrate: int = DEFAULT_NUM_CALIBRATE,
    atol: float | None = None,
    min_top1_agreement: float | None = None,
    coreml_input: str = "image",
    coreml_precision: str = "fp16",
    palettize_bits: int | None = None,
    expert_dispatch: str | None = None,
    capacity_ratio: float | None = None,
    priority: str | None = None,
    part: str | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> Path:
    """Export a model to ``fmt`` ("pte" | "coreml" | "onnx"), verify it, write ``out`` and ``out + ".json"``.

    Source: ``checkpoint`` (a model file or run directory) or ``model`` (+ ``model_kwargs``), the latter with
    random weights (seeded by ``seed``; said in the output and the sidecar). ``quantize``: for pte ``"int8"``
    (PT2E dynamic int8 of the transformer linears) or ``"int8-static"`` (PT2E static int8, calibrated on
    ``num_calibrate`` training images; see ``pte.lower_pte``); for coreml ``"int8"``: int8 weights. With an
    agreement bar, ``"int8"`` first returns the linears that cost most agreement to fp32, chosen in simulation
    on ``num_calibrate`` images like the verification ones but disjoint from them (``quantize.py``; the sidecar
    lists them). Images: ``data`` (a dataset directory or built-in name, built under ``data_root``), else the
    checkpoint's held-out list (topped up from val/), else the built-in synthetic set; ``num_verify`` of them.
    Thresholds (``verify.Thresholds``): fp32 max abs diff <= 1e-4 and 100 % top-1 agreement; int8 >= 99 %
    agreement for trained weights; ``atol`` / ``min_top1_agreement`` override. ``expert_dispatch`` (a MoE's
    experts): ``"switch"`` (default for pte and onnx: one ``torch.cond`` branch per expert, ``switch.py``) or
    ``"gather"`` (the model's own form: faster lowering; Core ML's only form). A per-token V-MoE is exported
    at ``capacity_ratio`` and ``priority`` (its inference routing; recorded in the sidecar), each expert as two
    linears with constant weights (``token.py``). An image-text model (LIMoE, one-tower, CLIP) exports ``part``
    (``image_text.py``): "image" (default), the zero-shot classifier with the checkpoint's class-prompt
    embeddings baked in, verified like any classifier; "text", the text encoder (int64 tokens -> normalised
    embedding), verified on tokenised prompts and captions. ``verbose``: print a summary.
    Raises UserError on bad input (before any lowering) and VerificationError when the check fails; either
    way nothing is left at ``out``.
    """
    t0 = time.perf_counter()
    req = Request(
        fmt=fmt, quantize=quantize, num_verify=num_verify, num_calibrate=num_calibrate, atol=atol,
        min_top1_agreement=min_top1_agreement, coreml_input=coreml_input, coreml_precision=coreml_precision,
        palettize_bits=palettize_bits, expert_dispatch=expert_dispatch, capacity_ratio=capacity_ratio,
        priority=priority, part=part,
    )  # fmt: skip
    req.check()
    with quiet_libraries():
        net, meta, random_weights = _load_source(checkpoint, model, model_kwargs, seed)
        net = export_part(net, meta, req.part, random_weights, checkpoint or f"--model {model}")
        if is_token_moe(net):
            try:
                net = token_for_export(net, req.capacity_ratio, req.priority)
            except ValueError as e:  # bpr_cls of a model without a class token
                raise UserError(f"--priority {req.priority}: {e}") from None
        elif req.capacity_ratio is not None or req.priority is not None:
            raise UserError(
                "--capacity-ratio and --priority apply to per-token V-MoE models (mobile_vmoe_token_*)"
            )
        out = _output_path(out, req, checkpoint, meta.model)
        if random_weights and verbose:
            print(f"note: {meta.model} has RANDOM weights (no checkpoint): for latency work only")
        remove_stale_temporaries(out)
        job = _prepare(req, net, meta, random_weights, checkpoint, out, data, data_root)
        with atomic_path(sidecar_path(out)) as tmp_json, atomic_path(out, suffix=FORMATS[fmt]) as tmp:
            failures = {"pte": _export_pte, "onnx": _export_onnx, "coreml": _export_coreml}[fmt](job, tmp)
            if failures:
                _remove(out, sidecar_path(out))  # an older artifact would now pass for this export
                raise VerificationError(
                    f"{fmt} export of {meta.model} failed verification: " + "; ".join(failures)
                )
            job.report["versions"] = _versions()
            job.report["export_seconds"] = round(time.perf_counter() - t0, 1)
            job.sidecar.details = job.report
            write_sidecar(tmp, job.sidecar, at=tmp_json)
    if verbose:
        print_summary(out, job.sidecar)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------


def _load_source(
    checkpoint: str | os.PathLike[str] | None,
    model: str | None,
    model_kwargs: dict[str, Any] | None,
    seed: int,
) -> tuple[nn.Module, ModelMeta, bool]:
    """-> (eval model, its metadata, random_weights). ``--model`` alone gives random weights."""
    if (checkpoint is None) == (model is None):
        raise UserError("give exactly one of --checkpoint CKPT or --model NAME")
    if checkpoint is not None:
        if model_kwargs:
            raise UserError("--model-kwargs applies to --model only; a checkpoint carries its own kwargs")
        m, meta = load_model(checkpoint)
        if not is_image_text(m) and len(meta.class_names) != m.num_classes:
            meta.class_names = [str(i) for i in range(m.num_classes)]
        return m, meta, False
    meta = ModelMeta(model=str(model), model_kwargs=dict(model_kwargs or {}), class_names=[],
                     preprocess=Preprocess(size=1, resize=1))  # fmt: skip
    from mobile_vmoe.models.names import project_models

    if model not in project_models():
        raise UserError(f"--model {model!r}: not a registered mobile-vmoe model (see `mobile-vmoe models`)")
    torch.manual_seed(seed)
    m = create_model(meta, "--model-kwargs").eval()
    meta.class_names = [] if is_image_text(m) else [str(i) for i in range(m.num_classes)]
    meta.preprocess = Preprocess.for_model(m)
    return m, meta, True


def _output_path(
    out: str | os.PathLike[str] | None, req: Request, checkpoint: str | os.PathLike[str] | None, model: str
) -> Path:
    """``out``, or ``<checkpoint or model name>[_int8].<ext>``; checked to be writable and of the right kind."""
    ext = FORMATS[req.fmt]
    if out is None:
        stem = model
        if checkpoint is not None:
            ck = Path(checkpoint)
            stem = ck.resolve().name if ck.is_dir() else ck.stem
        out = f"{stem}{'_text' if req.part == 'text' else ''}{'_int8' if req.quantize else ''}{ext}"
    out = Path(out)
    if out.suffix != ext:
        raise UserError(f"--out {out}: a {req.fmt} artifact must end in {ext}")
    for p in (out.parent, *out.parent.parents):  # the first existing ancestor must be a writable directory
        if p.exists():
            if not p.is_dir():
                raise UserError(f"--out {out}: {p} exists and is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"--out {out}: directory {p} is not writable")
            break
    if out.exists() and (out.is_dir() != (req.fmt == "coreml")):
        raise UserError(
            f"--out {out}: exists as a {'directory' if out.is_dir() else 'file'}; remove it first"
        )
    return out


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove what a killed export of ``out`` left beside it; returns what was removed.

    Only ``common.atomic_path``'s temporaries of ``out`` and of its sidecar: ``.NAME.XXXXXXXX[SUFFIX].tmp``
    (XXXXXXXX: tempfile's 8 random characters), and a temporary of such a temporary (``save_coreml``'s staging
    folder, the sidecar written at its temporary path). Other files, and other targets' temporaries, stay.
    """
    rand = "[a-z0-9_]{8}"
    patterns = []
    for name, suffix in ((out.name, out.suffix), (sidecar_path(out).name, "")):
        own = rf"\.{re.escape(name)}\.{rand}{re.escape(suffix)}\.tmp"
        patterns.append(re.compile(rf"{own}|\.{own}\.{rand}\.tmp"))
    removed = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            if any(pat.fullmatch(p.name) for pat in patterns):
                _remove(p)
                removed.append(p)
    return removed


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _prepare(
    req: Request,
    net: nn.Module,
    meta: ModelMeta,
    random_weights: bool,
    checkpoint: str | os.PathLike[str] | None,
    out: Path,
    data: str | os.PathLike[str] | None,
    data_root: str | os.PathLike[str],
) -> _Job:
    """Thresholds, real images, eager logits and the sidecar record: everything but the lowering."""
    thr = Thresholds.choose(req.fmt, bool(req.quantize), random_weights, req.atol, req.min_top1_agreement)
    text = isinstance(net, TextEncoder)
    # The dynamic scheme picks its fp32 layers on images of its own wherever an agreement bar applies.
    tune = req.fmt == "pte" and req.quantize == "int8" and thr.min_agreement is not None and not text
    n_cal = req.num_calibrate
    if text:
        images = verification_tokens(meta, int(net.model.context_length), req.num_verify, data)
    else:
        images = caption_images(meta, data, req.num_verify) if isinstance(net, ImageTextPart) else None
        if images is None:  # not a caption set: an image dataset, the checkpoint's or the built-in one
            images = load_images(meta, data, data_root, req.num_verify, n_cal if req.needs_calibration else 0,
                                 n_cal if tune else 0)  # fmt: skip
    if req.needs_calibration and not images.calibrate:
        raise UserError(
            "int8-static quantisation needs calibration images, and the dataset's train/ split gave none"
        )
    sc = Sidecar(
        format=req.fmt,
        artifact=out.name,
        model=meta.model,
        model_kwargs=meta.model_kwargs,
        class_names=meta.class_names,
        input_shape=getattr(net, "input_shape", None) or [1, 3, *(int(s) for s in net.patch_embed.img_size)],
        preprocess=meta.preprocess,
        precision=req.precision,
        # E experts, K chosen per image, L MoE blocks (the bench result schema's keys); null for a dense model.
        routing=token_routing_info(net)
        if is_token_moe(net)
        else {"E": int(net.num_experts), "K": int(net.top_k), "L": int(net.num_moe_layers)}
        if net.is_moe
        else None,
        # Absolute, so that `mobile-vmoe bench` finds the eager model (per-expert latency) from anywhere.
        checkpoint=str(resolve_model_file(checkpoint).resolve()) if checkpoint is not None else None,
        checkpoint_sha256=artifact_digest(resolve_model_file(checkpoint))[1]
        if checkpoint is not None
        else None,
        random_weights=random_weights,
    )
    describe_part(net, meta, sc)
    report: dict[str, Any] = {"texts" if text else "images": images.source, "notes": []}
    if random_weights:
        report["notes"].append("random weights (no checkpoint): for latency work only")
    n = images.verify.shape[0]
    if n < req.num_verify:
        what = "texts: prompts and sample captions are" if text else "images: the dataset has"
        report["notes"].append(f"verified on {n} {what} fewer than the {req.num_verify} asked for")
    return _Job(req, net, meta, images, eager_logits(net, images.verify), thr, sc, report)


def _export_pte(job: _Job, tmp: Path) -> list[str]:
    """Lower to ``tmp`` (int8: after choosing the linears that stay fp32), run it, compare; -> failures."""
    req, imgs = job.req, job.images
    keep_fp32: list[str] = []
    tuning = None
    if imgs.tune.shape[0] and job.thr.min_agreement is not None and req.quantize == "int8":
        keep_fp32, tuning = select_fp32_layers(job.net, imgs.tune, job.thr.min_agreement)
        if keep_fp32:
            log.info("int8: %d linear(s) kept fp32 for accuracy: %s", len(keep_fp32), ", ".join(keep_fp32))
    buf, delegation = pte.lower_pte(
        job.net, imgs.verify[:1], req.quantize, imgs.calibrate, keep_fp32=keep_fp32,
        expert_switch=req.expert_dispatch != "gather",
    )  # fmt: skip
    tmp.write_bytes(buf)
    job.sidecar.expert_dispatch = delegation.pop("expert_dispatch", None)
    job.sidecar.expert_dispatch_reason = delegation.pop("expert_dispatch_reason", None)
    job.report["delegation"] = delegation
    if req.quantize:
        job.report["quantization"] = {
            "name": req.quantize,
            "scheme": pte.INT8_SCHEMES[req.quantize],
            "calibration_images": len(imgs.calibrate),  # empty unless int8-static
            "fp32_layers": keep_fp32,
            "layer_choice": tuning,
        }
    job.report["parity"], failures = verify_pte(tmp, imgs.verify, job.ref, job.thr, _compare(job))
    return failures


def _export_onnx(job: _Job, tmp: Path) -> list[str]:
    example = job.images.verify[:1]
    names = ("tokens", "text_embeds") if isinstance(job.net, TextEncoder) else ("image", "logits")
    job.sidecar.expert_dispatch = export_onnx(
        job.net, example, tmp, expert_switch=job.req.expert_dispatch != "gather", names=names
    )
    job.report["parity"], failures = verify_onnx(tmp, job.images.verify, job.ref, job.thr, _compare(job))
    return failures


def _compare(job: _Job) -> Compare:
    return text_parity if isinstance(job.net, TextEncoder) else parity


def _export_coreml(job: _Job, tmp: Path) -> list[str]:
    """Convert into ``tmp`` and check the MIL program's structure (Core ML predicts only on Apple hardware)."""
    req, meta, net = job.req, job.meta, job.net
    text = isinstance(net, TextEncoder)
    job.report["coreml"] = {
        "input": "tokens (int32 [1, L])" if text else req.coreml_input,
        "minimum_deployment_target": "iOS17",
        "outputs": "text_embeds (normalised [1, P])"
        if text
        else "classLabel + classLabel_probs (softmax probabilities)",
    }
    with Progress("converting to Core ML", total=3) as progress:
        progress.stage("ct.convert")
        compress = {
            "precision": req.coreml_precision,
            "weights": req.quantize,
            "palettize_bits": req.palettize_bits,
        }
        if text:
            mlmodel = coreml.convert_coreml_text(net, net.input_shape[1], **compress)
        else:
            mlmodel = coreml.convert_coreml(
                net,
                tuple(int(s) for s in net.patch_embed.img_size),
                meta.class_names,
                meta.preprocess.mean,
                meta.preprocess.std,
                image_input=req.coreml_input == "image",
                **compress,
            )
        progress.advance()
        progress.stage("checking the MIL program")
        twin = None
        if isinstance(net, ImageTextPart) and net.is_moe:
            twin = dense_twin(net, meta.model, meta.model_kwargs)
            twin = (twin, torch.zeros(twin.input_shape, dtype=torch.long if text else torch.float32))
        job.report["mil_structure"], failures = coreml.check_structure(
            net, meta.model, meta.model_kwargs, mlmodel, twin
        )
        progress.advance()
        progress.stage("saving")
        coreml.save_coreml(mlmodel, tmp)
        progress.advance()
    job.report["parity"] = {"status": "pending: run on macOS", "n_images": 0}
    return failures


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out
