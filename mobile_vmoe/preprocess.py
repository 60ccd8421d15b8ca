"""One image preprocessing, from training to the phone.

``Preprocess`` is decided once, at training (from the model's timm pretrained cfg), stored in the model file's
metadata and copied into every export sidecar. Evaluation, the super-class stage, export verification, the host
bench and the iOS/Android harnesses all apply it, so the accuracy we report is the accuracy of what a phone runs:

    resize the shorter side to ``resize`` (``interpolation``) -> centre crop ``size`` x ``size``
    -> scale to [0, 1] -> (x - mean) / std, per RGB channel
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .common import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["HIGH_BIT_MODES", "INTERPOLATIONS", "Preprocess", "to_rgb8"]

# timm.data's IMAGENET_DEFAULT_MEAN / _STD (a test holds them equal): importing timm costs the bench's child
# process, which times a model file and needs neither timm nor torch, seconds.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is no image size


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Preprocess:
    size: int  # model input, size x size
    resize: int  # the shorter side is resized to this before the centre crop (>= size)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        problems = []
        if not (_is_int(self.size) and self.size >= 1):
            problems.append(f"size must be an integer >= 1, got {self.size!r}")
        elif not (_is_int(self.resize) and self.resize >= self.size):
            problems.append(f"resize must be an integer >= size ({self.size}), got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        for name in ("mean", "std"):
            v = getattr(self, name)
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v)
            if not ok or (name == "std" and min(v) <= 0):
                problems.append(f"{name} must be 3 numbers{' > 0' if name == 'std' else ''}, got {v!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def crop_pct(self) -> float:
        return self.size / self.resize

    @classmethod
    def for_model(cls, model: torch.nn.Module, crop_pct: float | None = None) -> Preprocess:
        """timm's eval preprocessing for ``model`` (its pretrained cfg), resize = floor(size / crop_pct) as timm."""
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        pe = getattr(model, "patch_embed", None)  # img_size=... overrides the cfg's input size
        size = int(pe.img_size[-1]) if pe is not None else int(cfg.get("input_size", (3, 224, 224))[-1])
        pct = float(crop_pct if crop_pct is not None else cfg.get("crop_pct", 1.0))
        return cls(
            size=size,
            resize=max(size, math.floor(size / pct)),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            mean=tuple(float(x) for x in cfg.get("mean", IMAGENET_DEFAULT_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg.get("std", IMAGENET_DEFAULT_STD)),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Preprocess:
        """Parse a stored record; a bad one is a UserError naming ``where`` (the file and field)."""
        if not isinstance(d, Mapping):
            raise UserError(
                f"{where}: expected an object with size, resize, interpolation, mean, std; got {d!r}"
            )
        unknown = set(d) - {"size", "resize", "interpolation", "mean", "std"}
        if unknown or not {"size", "resize"} <= set(d):
            raise UserError(f"{where}: expected keys size, resize, interpolation, mean, std; got {sorted(d)}")
        try:
            return cls(
                size=d["size"],
                resize=d["resize"],
                interpolation=d.get("interpolation", "bicubic"),
                mean=tuple(d.get("mean", IMAGENET_DEFAULT_MEAN)),  # type: ignore[arg-type]
                std=tuple(d.get("std", IMAGENET_DEFAULT_STD)),  # type: ignore[arg-type]
            )
        except (ValueError, TypeError) as e:
            raise UserError(f"{where}: {e}") from None

    def transform(self) -> Any:
        """torchvision transform: PIL image -> normalised [3, size, size] float tensor."""
        from torchvision import transforms

        return transforms.Compose(
            [
                transforms.Lambda(to_rgb8),
                transforms.Resize(
                    self.resize, interpolation=transforms.InterpolationMode(self.interpolation)
                ),
                transforms.CenterCrop(self.size),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, img: Image.Image) -> np.ndarray:
        """One PIL image -> [1, 3, size, size] float32 array (what the host bench feeds a runtime)."""
        return self.transform()(img).numpy()[None].astype(np.float32)


# PIL modes of more than 8 bits per grey pixel, whose convert("RGB") clips to white instead of scaling.
# (PIL opens 48- and 64-bit colour PNGs as 8-bit RGB / RGBA from the high bytes: already scaled.)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, high bit depths scaled (PIL's convert("RGB") clips 16-bit PNGs to white)."""
    if img.mode in HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if a.max() <= 1.0 else top
        a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")  # uint8 [H, W]: mode L
    return img.convert("RGB")
