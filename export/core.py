"""``export_model``: one checkpoint (or a named model with random weights) -> a verified mobile artifact + sidecar.

Flow: check the arguments and the output path -> load the model -> load real images (the checkpoint's
held-out list, topped up from the dataset's val/ split; or the built-in synthetic set) -> lower into a temporary
path beside the target -> run it here (ExecuTorch runtime, ONNX Runtime) and compare with eager PyTorch, or for
Core ML (no predictions on Linux) check the MIL program's structure -> rename into place and write
``TARGET.json``. A failed check raises ``VerificationError`` and leaves nothing at the target.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobile_vmoe.checkpoint import ModelMeta, create_model, load_model, resolve_model_file
from mobile_vmoe.common import UserError, atomic_path
from mobile_vmoe.files.file_list import read_file_list
from mobile_vmoe.files.sidecar import Sidecar, write_sidecar
from mobile_vmoe.preprocess import Preprocess

from . import formats
from .quantize import eager_logits, select_fp32_layers

__all__ = ["export_model", "VerificationError", "FORMATS", "DEFAULT_NUM_VERIFY"]

FORMATS: dict[str, str] = {"pte": ".pte", "coreml": ".mlpackage", "onnx": ".onnx"}
DEFAULT_NUM_VERIFY = 500
DEFAULT_NUM_CALIBRATE = 500  # int8-static calibration (training images), int8's layer choice (held-out)
FP32_ATOL = 1e-4
INT8_MIN_AGREEMENT = 0.99
_LIBS = ("torch", "timm", "executorch", "torchao", "coremltools", "onnx", "onnxruntime", "onnxscript")


class VerificationError(RuntimeError):
    """The exported artifact does not match eager PyTorch (or, for Core ML, lost the sparse structure)."""


@dataclass
class _Images:
    verify: torch.Tensor  # [N, 3, H, W], normalised as the model expects
    calibrate: list[torch.Tensor]  # [1, 3, H, W] each; empty unless int8-static needs them
    tune: torch.Tensor  # [N, 3, H, W]: int8's choice of fp32 layers; empty unless it needs them
    source: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Argument checks (before any expensive work)
# ---------------------------------------------------------------------------------------------------------------


def _check_out(out: Path, fmt: str) -> None:
    ext = FORMATS[fmt]
    if out.suffix != ext:
        raise UserError(f"--out {out}: a {fmt} artifact must end in {ext}")
    parent = out.parent
    for p in (parent, *parent.parents):  # the first existing ancestor must be a writable directory
        if p.exists():
            if not p.is_dir():
                raise UserError(f"--out {out}: {p} exists and is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"--out {out}: directory {p} is not writable")
            break
    if out.exists() and (out.is_dir() != (fmt == "coreml")):
        raise UserError(
            f"--out {out}: exists as a {'directory' if out.is_dir() else 'file'}; remove it first"
        )


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
        if len(meta.class_names) != m.num_classes:
            meta.class_names = [str(i) for i in range(m.num_classes)]
        return m, meta, False
    meta = ModelMeta(model=str(model), model_kwargs=dict(model_kwargs or {}), class_names=[],
                     preprocess=Preprocess(size=1, resize=1))  # fmt: skip
    import timm

    if model not in timm.list_models("mobile_v*"):
        raise UserError(f"--model {model!r}: not a registered mobile-vmoe model (see `mobile-vmoe models`)")
    torch.manual_seed(seed)
    m = create_model(meta, "--model-kwargs").eval()
    meta.class_names = [str(i) for i in range(m.num_classes)]
    meta.preprocess = Preprocess.for_model(m)
    return m, meta, True


# ---------------------------------------------------------------------------------------------------------------
# Real images
# ---------------------------------------------------------------------------------------------------------------


def _spread(samples: list, n: int, seed: int = 0) -> list:
    """A deterministic random subset of n samples (all classes, not just the first folders)."""
    if len(samples) <= n:
        return list(samples)
    idx = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[i] for i in sorted(idx)]


def _load_tensors(data_dir: Path, samples: list, transform: Any) -> torch.Tensor:
    from mobile_vmoe.data import ImageListDataset, collate_skip_bad

    if not samples:
        return torch.empty(0)
    ds = ImageListDataset(data_dir, samples, transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False, collate_fn=collate_skip_bad)
    return torch.cat([x for x, _, _ in loader if x.numel()])


def _images(
    meta: ModelMeta,
    data: str | os.PathLike[str] | None,
    data_root: str | os.PathLike[str],
    num_verify: int,
    num_calibrate: int,
    num_tune: int = 0,
) -> _Images:
    from mobile_vmoe.data import prepare_dataset, scan_dataset

    heldout: list = []
    source: dict[str, Any] = {}
    if data is not None:
        data_dir = prepare_dataset(str(data), root=data_root)
        source["data_dir"] = str(data_dir)
    elif meta.train.data_dir:
        data_dir = Path(meta.train.data_dir)
        if not data_dir.is_dir():
            raise UserError(
                f"checkpoint metadata names data_dir {data_dir}, which does not exist here; pass --data DIR"
            )
        source["data_dir"] = str(data_dir)
        if meta.train.heldout_list:
            heldout = read_file_list(meta.train.heldout_list, data_dir)
            source["heldout_list"] = meta.train.heldout_list
    else:
        # Default sizes on purpose: prepare_dataset rebuilds a directory whose parameters differ, so any other
        # choice could replace the dataset a training run uses.
        data_dir = prepare_dataset("synthetic", root=data_root)
        source["data_dir"] = str(data_dir)
        source["builtin"] = "synthetic"
    index = scan_dataset(data_dir)
    held = set(heldout)
    verify = _spread(heldout, num_verify)
    if len(verify) < num_verify:  # top up from the val split, then from training images nobody calibrates on
        verify += _spread(index.val, num_verify - len(verify))
    calib_pool = [s for s in index.train if s not in held]
    calibrate = _spread(calib_pool, num_calibrate, seed=1) if num_calibrate else []
    if len(verify) < num_verify:
        used = set(calibrate)
        rest = [s for s in calib_pool if s not in used]
        verify += _spread(rest, num_verify - len(verify), seed=2)
    source["num_heldout"] = min(len(heldout), num_verify)
    tf = meta.preprocess.transform()  # what the model was evaluated with, and what the sidecar tells apps
    # Tuning images are like the verification images (held out, then val) but not the same ones: training
    # images are fitted, so int8 flips far fewer of them (demo dense model: 99.6 % agreement against 99.0 %).
    tune: list = []
    if num_tune:
        chosen = set(verify)
        tune = _spread([s for s in heldout if s not in chosen], num_tune, seed=3)
        if len(tune) < num_tune:
            tune += _spread([s for s in index.val if s not in chosen], num_tune - len(tune), seed=3)
        if len(tune) < num_tune:
            chosen |= set(calibrate)
            rest = [s for s in calib_pool if s not in chosen]
            tune += _spread(rest, num_tune - len(tune), seed=4)
    xv = _load_tensors(data_dir, verify, tf)
    if xv.shape[0] == 0:
        raise UserError(f"{data_dir}: no readable images to verify the export on")
    xc = _load_tensors(data_dir, calibrate, tf)
    return _Images(
        verify=xv,
        calibrate=[xc[i : i + 1] for i in range(xc.shape[0])],
        tune=_load_tensors(data_dir, tune, tf),
        source=source,
    )


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------


def _parity(
    ref: torch.Tensor, out: torch.Tensor, atol: float | None, min_agreement: float | None
) -> tuple[dict[str, Any], list[str]]:
    diff = float((out.float() - ref.float()).abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    figures = {
        "n_images": int(ref.shape[0]),
        "max_abs_diff": diff,
        "top1_agreement": agree,
        "atol": atol,
        "min_top1_agreement": min_agreement,
    }
    failures = []
    if atol is not None and not diff <= atol:
        failures.append(f"max abs difference {diff:.3g} > {atol:.3g}")
    if min_agreement is not None and agree < min_agreement:
        failures.append(f"top-1 agreement {agree:.2%} < {min_agreement:.2%}")
    return figures, failures


def _coreml_structure(
    model: nn.Module, model_name: str, kwargs: dict, mlmodel: Any
) -> tuple[dict, list[str]]:
    """MoE: the expert weights must be gathered, and the matmul count must stay ~ the dense twin's + router
    (computing all experts would add 2 * L * (E - 1) matmuls)."""
    import coremltools as ct
    import timm

    E, L = int(getattr(model, "num_experts", 0)), int(getattr(model, "num_moe_layers", 0))
    stats = formats.mil_op_stats(mlmodel, E)
    out: dict[str, Any] = {"moe": stats}
    failures: list[str] = []
    if not L:
        return {"dense": stats}, failures
    twin = timm.create_model(model_name, **{**kwargs, "num_moe_layers": 0}).eval()
    with torch.no_grad():
        ep = torch.export.export(twin, (torch.zeros(1, 3, *twin.patch_embed.img_size),)).run_decompositions(
            {}
        )
    twin_ml = ct.convert(ep, convert_to="milinternal", minimum_deployment_target=ct.target.iOS17)
    dense_mm = sum(1 for t in _iter_ops(twin_ml.functions["main"]) if t in formats.MATMUL_OPS)
    extra = stats["matmul_ops"] - dense_mm
    out["dense_twin_matmul_ops"] = dense_mm
    out["extra_matmul_ops_over_dense"] = extra
    out["all_experts_would_add"] = 2 * L * (E - 1) + 1
    if len(stats["expert_weight_gathers"]) < 2 * L:
        failures.append(
            f"MIL program gathers {len(stats['expert_weight_gathers'])} stacked [E={E}, ...] expert weights, "
            f"expected >= {2 * L} (fc1 and fc2 of {L} MoE blocks)"
        )
    # Expected extra: the router's projection, and with K > 1 per MoE block the gated fc2 bias (gates @ b2).
    if extra > 1 + 2 * L:
        failures.append(
            f"MIL program has {stats['matmul_ops']} matmul/linear ops vs {dense_mm} for the dense twin: "
            f"looks like the experts are all computed (sparse compute lost)"
        )
    out["sparse_compute_preserved"] = not failures
    return out, failures


def _iter_ops(block: Any):
    for op in block.operations:
        yield op.op_type
        for b in op.blocks:
            yield from _iter_ops(b)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


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
    seed: int = 0,
    verbose: bool = True,
) -> Path:
    """Export a model to ``fmt`` ("pte" | "coreml" | "onnx"), verify it, write ``out`` and ``out + ".json"``.

    Source: ``checkpoint`` (a model file or run directory) or ``model`` (+ ``model_kwargs``), the latter with
    random weights (seeded by ``seed``; said in the output and the sidecar). ``quantize``: for pte ``"int8"``
    (PT2E dynamic int8 of the transformer linears) or ``"int8-static"`` (PT2E static int8, calibrated on
    ``num_calibrate`` training images; see ``formats.lower_pte``); for coreml ``"int8"``: int8 weights. With an
    agreement bar, ``"int8"`` first returns the linears that cost most agreement to fp32, chosen in simulation
    on ``num_calibrate`` images like the verification ones but disjoint from them (held-out, then val, then
    training images; ``quantize.select_fp32_layers``; the sidecar lists them).
    Images: ``data`` (a dataset directory or built-in name, built under ``data_root``), else the checkpoint's
    held-out list (topped up from val/), else the built-in synthetic set; ``num_verify`` of them.
    Thresholds: fp32 defaults to max abs diff <= 1e-4 and 100% top-1 agreement; int8 to >= 99% agreement,
    enforced by default only for trained weights (random-weight logits are nearly tied, so int8 flips them);
    ``atol`` / ``min_top1_agreement`` override and are then always enforced. ``expert_dispatch`` (a MoE's
    experts): ``"switch"`` (default for pte and onnx: one ``torch.cond`` branch per expert, ``switch.py``) or
    ``"gather"`` (the model's own form: faster lowering; Core ML's only form). Raises UserError on bad input
    (before any lowering) and VerificationError when the check fails; either way nothing is left at ``out``.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if quantize not in (None, *formats.INT8_SCHEMES):
        raise UserError(f"--quantize {quantize!r}: expected one of {sorted(formats.INT8_SCHEMES)}")
    if quantize == "int8-static" and fmt != "pte":
        raise UserError(
            "--quantize int8-static is a .pte scheme; coreml takes --quantize int8 (int8 weights)"
        )
    if quantize and fmt == "onnx":
        raise UserError("--quantize int8 is not supported for onnx here; use pte or coreml")
    if coreml_input not in ("image", "tensor") or coreml_precision not in ("fp16", "fp32"):
        raise UserError(
            f"Core ML options: input must be image|tensor (got {coreml_input!r}), precision fp16|fp32 "
            f"(got {coreml_precision!r})"
        )
    if palettize_bits is not None and (fmt != "coreml" or palettize_bits not in (1, 2, 3, 4, 6, 8)):
        raise UserError("--palettize-bits applies to coreml only and must be one of 1, 2, 3, 4, 6, 8")
    if palettize_bits is not None and quantize:
        raise UserError("--palettize-bits and --quantize int8 are two weight compressions: pick one")
    if expert_dispatch not in (None, "switch", "gather"):
        raise UserError(f"--expert-dispatch {expert_dispatch!r}: expected switch or gather")
    if expert_dispatch == "switch" and fmt == "coreml":
        raise UserError("--expert-dispatch switch is for pte and onnx; Core ML gathers the expert weights")
    switch = expert_dispatch != "gather"
    if num_verify < 1:
        raise UserError(f"num_verify must be >= 1, got {num_verify}")
    for name, v in (("atol", atol), ("min_top1_agreement", min_top1_agreement)):
        if v is not None and (v < 0 or (name == "min_top1_agreement" and v > 1)):
            raise UserError(f"{name} must be >= 0{' and <= 1' if name != 'atol' else ''}, got {v}")

    net, meta, random_weights = _load_source(checkpoint, model, model_kwargs, seed)
    model_name, kwargs, class_names = meta.model, meta.model_kwargs, meta.class_names
    if out is None:
        stem = Path(checkpoint).stem if checkpoint is not None and Path(checkpoint).is_file() else model_name
        if checkpoint is not None and Path(checkpoint).is_dir():
            stem = Path(checkpoint).resolve().name
        out = f"{stem}{'_int8' if quantize else ''}{FORMATS[fmt]}"
    out = Path(out)
    _check_out(out, fmt)
    sidecar = out.with_name(out.name + ".json")
    if random_weights and verbose:
        print(f"note: {model_name} has RANDOM weights (no checkpoint): for latency work only")

    size = tuple(int(s) for s in net.patch_embed.img_size)
    mean, std = meta.preprocess.mean, meta.preprocess.std
    atol_eff: float | None = None
    agree_eff: float | None = None
    if fmt != "coreml":
        if quantize:
            atol_eff = atol
            agree_eff = min_top1_agreement
            if agree_eff is None and not random_weights:
                agree_eff = INT8_MIN_AGREEMENT
        else:
            atol_eff = FP32_ATOL if atol is None else atol
            agree_eff = 1.0 if min_top1_agreement is None else min_top1_agreement
    need_calib = quantize == "int8-static"
    # The dynamic scheme picks its fp32 layers on images of its own wherever an agreement bar applies.
    tune = fmt == "pte" and quantize == "int8" and agree_eff is not None
    imgs = _images(
        meta, data, data_root, num_verify, num_calibrate if need_calib else 0,
        num_calibrate if tune else 0,
    )  # fmt: skip
    if need_calib and not imgs.calibrate:
        raise UserError(
            "int8-static quantisation needs calibration images, and the dataset's train/ split gave none"
        )
    ref = eager_logits(net, imgs.verify)
    example = imgs.verify[:1]

    if quantize:
        precision = "int8" if fmt == "pte" else f"{coreml_precision}+int8-weights"
    elif fmt == "coreml":
        precision = coreml_precision
    else:
        precision = "fp32"
    if palettize_bits:
        precision += f"+palettized{palettize_bits}"

    sc = Sidecar(
        format=fmt,
        artifact=out.name,
        model=model_name,
        model_kwargs=kwargs,
        class_names=class_names,
        input_shape=[1, 3, *size],
        preprocess=meta.preprocess,
        precision=precision,
        # E experts, K chosen per image, L MoE blocks (the bench result schema's keys); null for a dense model.
        routing={"E": int(net.num_experts), "K": int(net.top_k), "L": int(net.num_moe_layers)}
        if net.is_moe
        else None,
        # Absolute, so that `mobile-vmoe bench` finds the eager model (per-expert latency) from anywhere.
        checkpoint=str(resolve_model_file(checkpoint).resolve()) if checkpoint is not None else None,
        random_weights=random_weights,
    )
    report: dict[str, Any] = {"images": imgs.source, "notes": []}  # the verification report, for people
    if random_weights:
        report["notes"].append("random weights (no checkpoint): for latency work only")
    if imgs.verify.shape[0] < num_verify:
        report["notes"].append(
            f"verified on {imgs.verify.shape[0]} images: the dataset has fewer than the {num_verify} asked for"
        )
    failures: list[str] = []
    with atomic_path(sidecar) as tmp_json, atomic_path(out, suffix=FORMATS[fmt]) as tmp:
        if fmt == "pte":
            keep_fp32: list[str] = []
            tuning = None
            if tune and imgs.tune.shape[0]:
                keep_fp32, tuning = select_fp32_layers(net, imgs.tune, agree_eff)
                if verbose and keep_fp32:
                    print(
                        f"  int8: {len(keep_fp32)} linear(s) kept fp32 for accuracy: {', '.join(keep_fp32)}"
                    )
            buf, delegation = formats.lower_pte(
                net, example, quantize, imgs.calibrate, keep_fp32=keep_fp32, expert_switch=switch
            )
            tmp.write_bytes(buf)
            sc.expert_dispatch = delegation.pop("expert_dispatch", None)
            sc.expert_dispatch_reason = delegation.pop("expert_dispatch_reason", None)
            report["delegation"] = delegation
            if quantize:
                report["quantization"] = {
                    "name": quantize,
                    "scheme": formats.INT8_SCHEMES[quantize],
                    "calibration_images": len(imgs.calibrate),  # empty unless int8-static
                    "fp32_layers": keep_fp32,
                    "layer_choice": tuning,
                }
            got = formats.PteRunner(tmp)(imgs.verify)
            report["parity"], failures = _parity(ref, got, atol_eff, agree_eff)
            report["parity"]["runtime"] = "executorch.runtime (XNNPACK)"
        elif fmt == "onnx":
            sc.expert_dispatch = formats.export_onnx(net, example, tmp, expert_switch=switch)
            runner = formats.OnnxRunner(tmp)
            # One image per run, as an app runs it (a MoE takes its expert switch), and then all images as one
            # batch (mixed routing: a MoE's gather form): both must match eager.
            got = torch.cat([runner(x[None]) for x in imgs.verify])
            report["parity"], failures = _parity(ref, got, atol_eff, agree_eff)
            batched, batch_failures = _parity(ref, runner(imgs.verify), atol_eff, agree_eff)
            report["parity"]["batched"] = {k: batched[k] for k in ("max_abs_diff", "top1_agreement")}
            failures += [f"in one batch: {f}" for f in batch_failures]
            report["parity"]["runtime"] = "onnxruntime CPUExecutionProvider"
        else:
            mlmodel = formats.convert_coreml(
                net,
                size,
                class_names,
                mean,
                std,
                image_input=coreml_input == "image",
                precision=coreml_precision,
                weights=quantize,
                palettize_bits=palettize_bits,
            )
            report["coreml"] = {
                "input": coreml_input,
                "minimum_deployment_target": "iOS17",
                "outputs": "classLabel + classLabel_probs (softmax probabilities)",
            }
            report["mil_structure"], failures = _coreml_structure(net, model_name, kwargs, mlmodel)
            report["parity"] = {"status": "pending: run on macOS", "n_images": 0}
            formats.save_coreml(mlmodel, tmp)
        if failures:
            # An older artifact at the target would now pass for this export: remove it with its sidecar.
            for stale in (out, sidecar):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
            raise VerificationError(
                f"{fmt} export of {model_name} failed verification: " + "; ".join(failures)
            )
        report["versions"] = _versions()
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        sc.details = report
        write_sidecar(tmp, sc, at=tmp_json)
    if verbose:
        _print_summary(out, sc)
    return out


def _print_summary(out: Path, sc: Sidecar) -> None:
    rt, r = sc.routing, sc.details
    kind = f"MoE E={rt['E']} K={rt['K']} L={rt['L']}" if rt else "dense"
    weights = "RANDOM weights" if sc.random_weights else "trained weights"
    print(
        f"wrote {out} ({(sc.file_size_bytes or 0) / 1e6:.2f} MB): {sc.model} [{kind}], {sc.precision}, {weights}"
    )
    p = r["parity"]
    if "max_abs_diff" in p:
        thr = []
        if p["atol"] is not None:
            thr.append(f"atol {p['atol']:g}")
        if p["min_top1_agreement"] is not None:
            thr.append(f"min agreement {p['min_top1_agreement']:.0%}")
        print(
            f"  parity vs eager on {p['n_images']} images: max abs diff {p['max_abs_diff']:.3g}, "
            f"top-1 agreement {p['top1_agreement']:.2%} (checked: {', '.join(thr) or 'not enforced, random weights'})"
        )
    else:
        print(f"  parity: {p['status']}")
    if "delegation" in r:
        d = r["delegation"]
        deleg = sum(d["delegated_ops"].values())
        print(f"  XNNPACK: {deleg} ops in {d['num_delegated_subgraphs']} subgraphs")
        port = ", ".join(f"{formats.clean_op_name(k)} x{v}" for k, v in d["portable_ops"].items())
        print(f"  portable kernels: {port or 'none'}")
    if "mil_structure" in r:
        s = r["mil_structure"]
        if "moe" in s:
            m = s["moe"]
            print(
                f"  MIL: {m['matmul_ops']} matmul/linear ops (dense twin {s['dense_twin_matmul_ops']}), "
                f"{len(m['expert_weight_gathers'])} gathers on stacked expert weights"
            )
        else:
            print(f"  MIL: {s['dense']['matmul_ops']} matmul/linear ops")
    print(f"  sidecar: {out.name}.json")
