"""Latency of exported LIMoE zero-shot classifiers against the dense one-tower and two-tower models, batch 1, on
this host, measured side by side in one run.

The zero-shot classifier export (``export/image_text.py``: the image path and C = 1000 class embeddings baked in)
of LIMoE (``mobile_limoe_*``: E=8, top-1 per-token routing in every other block, BPR, capacity ratio 1.05, in its
export form ``export/token.py``), the dense one-tower model (``mobile_onetower_*``) and the dense two-tower CLIP
(``mobile_clip_*``), through the ExecuTorch runtime (XNNPACK) and ONNX Runtime:
    (a) LIMoE / one-tower                                   goal <= 1.10
    (b) LIMoE / two-tower CLIP                              for information (same image tower as one-tower)
    (c) text encoder (``--part text``), LIMoE / one-tower   for information (captions of the full context)
    (d) LIMoE with MoE in 2 blocks / one-tower              for information: ``moe_every=6``, as few MoE blocks as
                                                            Mobile V-MoE's L=2 (the paper's LIMoE has 6 of 12)
Weights are random (latency does not depend on them; the routing's buffers have a fixed size), and so are the
class embeddings. Models of one runtime run in interleaved rounds, each runtime in a process of its own. Beside
(a), (b) and (d), the floor: the same ratio of LIMoE's static form, the same experts on fixed token slices with no
routing, timed in the same rounds (``_floor.py``).

    python benchmarks/limoe_latency.py            # tiny 224 px: lowering takes ~1 min per model
    python benchmarks/limoe_latency.py --quick    # nano models at 32 px, for a smoke run
    python benchmarks/limoe_latency.py --profile  # also where the time goes (``_profile.py``)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    Goal,
    Ratio,
    build,
    lower_artifact,
    num_rounds,
    print_medians,
    print_ratios,
    time_runtimes,
    timing_args,
)
from _floor import STATIC, floor_medians, static_form
from _profile import print_profiles, profile_ptes
from mobile_vmoe.export.image_text import TextEncoder, ZeroShotClassifier
from mobile_vmoe.export.token import for_export

from mobile_vmoe.text import SAMPLE_CAPTIONS, Tokenizer

NUM_CLASSES = 1000  # ImageNet's zero-shot head


def size(quick: bool) -> str:
    """The towers' size: ViT-Tiny 224, or nano 32 px for a smoke run."""
    return "nano_patch8_32" if quick else "tiny_patch16_224"


def export_models(
    quick: bool, text: bool = True
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """(zero-shot classifiers with the static forms of the MoE ones, the floors of ``_floor.py``; text encoders),
    by key, in export form (``size``)."""
    names = {key: f"mobile_{key}_{size(quick)}" for key in ("limoe", "onetower", "clip")}
    towers = {key: build(name) for key, name in names.items()}
    towers["limoe_2moe"] = build(names["limoe"], moe_every=6)  # blocks 5 and 11 of 12
    P = towers["limoe"].embed_dim
    class_embeds = F.normalize(
        torch.randn(NUM_CLASSES, P, generator=torch.Generator().manual_seed(0)), dim=-1
    )

    def export_form(part: torch.nn.Module) -> torch.nn.Module:
        return for_export(part) if part.is_moe else part.eval()

    images = {key: export_form(ZeroShotClassifier(m, class_embeds)) for key, m in towers.items()}
    images |= {k + STATIC: static_form(images[k]) for k in ("limoe", "limoe_2moe")}
    texts = {k: export_form(TextEncoder(towers[k])) for k in ("limoe", "onetower")} if text else {}
    return images, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, rounds=60, quick_rounds=10)
    ap.add_argument("--no-text", action="store_true", help="skip the text encoders (c)")
    args = ap.parse_args()
    rounds = num_rounds(args)
    images, texts = export_models(args.quick, text=not args.no_text)
    x = torch.randn(images["limoe"].input_shape)
    L = images["limoe"].model.context_length
    tokens = Tokenizer(L)([SAMPLE_CAPTIONS[5]]).tokens  # the longest sample caption: the full context

    paths: dict[str, Path] = {}
    text_paths: dict[str, Path] = {}

    def lower(
        fmt: str, key: str, model: torch.nn.Module, example: torch.Tensor, into: dict[str, Path]
    ) -> None:
        into[f"{fmt}/{key}"] = lower_artifact(fmt, Path(tmp) / f"{key}.{fmt}", model, example)

    with tempfile.TemporaryDirectory(prefix="limoe-latency-") as tmp:
        for fmt in ("pte", "onnx"):
            for key, m in images.items():  # the static forms too
                lower(fmt, key, m, x, paths)
            for key, m in texts.items():
                lower(fmt, f"{key}_text", m, tokens, text_paths)
        samples = time_runtimes(paths, x, rounds, args)
        models = {k: p for k, p in paths.items() if not k.endswith(STATIC)}
        prof = profile_ptes(models, x, args) if args.profile else None
        if text_paths:
            samples.update(time_runtimes(text_paths, tokens, rounds, args))

    print_medians(
        f"zero-shot classifiers ({NUM_CLASSES} classes) of {size(args.quick)}, batch 1, {rounds} rounds",
        samples,
    )
    rows = []
    for rt in ("pte", "onnx"):
        rows += [
            Ratio("a", "LIMoE / one-tower (zero-shot classifier)", rt, "limoe", "onetower", Goal(1.10)),
            Ratio("b", "LIMoE / two-tower CLIP (zero-shot classifier)", rt, "limoe", "clip"),
        ]
        if texts:
            rows.append(Ratio("c", "LIMoE / one-tower (text encoder)", rt, "limoe_text", "onetower_text"))
        rows.append(Ratio("d", "LIMoE, MoE in 2 blocks / one-tower", rt, "limoe_2moe", "onetower"))
    print_ratios(rows, samples, args.iters, floor_medians(samples))
    if prof:
        print_profiles(prof, "onetower")


if __name__ == "__main__":
    main()
