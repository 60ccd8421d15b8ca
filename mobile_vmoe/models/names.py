"""The model names this package registers with timm, by family (one place, so no caller hard-codes a glob)."""

from __future__ import annotations

import timm

CLASSIFIER_FAMILIES = ("mobile_vit_*", "mobile_vmoe_*")  # dense, per-image and per-token image classifiers
IMAGE_TEXT_FAMILIES = (
    "mobile_limoe_*",
    "mobile_onetower_*",
    "mobile_clip_*",
)  # contrastive image-text towers


def _names(globs: tuple[str, ...]) -> list[str]:
    return sorted({n for g in globs for n in timm.list_models(g)})


def classifier_models() -> list[str]:
    """Registered image classifiers (dense ViT, per-image Mobile V-MoE, per-token V-MoE)."""
    return _names(CLASSIFIER_FAMILIES)


def image_text_models() -> list[str]:
    """Registered image-text models (LIMoE, dense one-tower, dense two-tower)."""
    return _names(IMAGE_TEXT_FAMILIES)


def project_models() -> list[str]:
    """Every registered mobile-vmoe model."""
    return _names(CLASSIFIER_FAMILIES + IMAGE_TEXT_FAMILIES)
