"""Parameter and FLOP counts, measured with torch.utils.flop_counter rather than hand formulas."""

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .moe import ExpertMlp


@dataclass(frozen=True)
class ModelProfile:
    params: int  # every parameter the model stores
    active_params: int  # parameters one image touches: shared ones plus K experts per MoE block
    flops: int  # forward FLOPs for one image (a multiply-add counts as 2), measured at batch 1 in eval mode

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, active per image)."""
    total = sum(p.numel() for p in model.parameters())
    # per-image routing runs K experts per image; per-token routing reaches every expert its tokens pick
    top_k = getattr(model, "active_experts_per_image", None) or getattr(model, "top_k", 0) or 0
    inactive = 0
    for m in model.modules():
        if isinstance(m, ExpertMlp):
            per_expert = sum(p.numel() for p in m.parameters()) // m.num_experts
            inactive += per_expert * (m.num_experts - top_k)
    return total, total - inactive


def built_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: its patch embedding's (``img_size=`` may differ from its name's size),
    else its pretrained config's."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return (pe.proj.in_channels, *pe.img_size)
    return tuple(model.pretrained_cfg["input_size"])  # type: ignore[index,return-value]


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Forward FLOPs for a single image (batch 1, ``built_input_size`` by default), model in eval mode; an
    image-text model (``is_image_text``) runs one image and one full-length caption."""
    if input_size is None:
        input_size = built_input_size(model)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            p = next(model.parameters())
            images = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
            if getattr(model, "is_image_text", False):  # with a full-length caption: both modalities
                model(images, torch.ones(1, model.context_length, dtype=torch.long, device=p.device))
            else:
                model(images)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def profile_model(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> ModelProfile:
    total, active = count_params(model)
    return ModelProfile(params=total, active_params=active, flops=count_flops(model, input_size))
