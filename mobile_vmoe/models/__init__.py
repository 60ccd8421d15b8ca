"""Model families. Importing this package registers every model with timm."""

from .moe import ExpertMlp, MoEBlock, Router, Routing, expert_load, load_balancing_loss
from .profile import ModelProfile, count_flops, count_params, profile_model
from .vit import VARIANTS, MobileVMoE, upcycle_dense_state_dict

__all__ = [
    "ExpertMlp",
    "MoEBlock",
    "MobileVMoE",
    "ModelProfile",
    "Router",
    "Routing",
    "VARIANTS",
    "count_flops",
    "count_params",
    "expert_load",
    "load_balancing_loss",
    "profile_model",
    "upcycle_dense_state_dict",
]
