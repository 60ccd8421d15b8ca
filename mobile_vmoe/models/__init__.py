"""Model families. Importing this package registers every model with timm."""

from .init_from import init_from
from .moe import ExpertMlp, MoEBlock, Router, Routing, choose_experts, expert_load, load_balancing_loss
from .profile import ModelProfile, count_flops, count_params, profile_model
from .vit import VARIANTS, MobileVMoE, checkpoint_filter_fn, remap_state_dict, upcycle_dense_state_dict

__all__ = [
    "ExpertMlp",
    "MoEBlock",
    "MobileVMoE",
    "ModelProfile",
    "Router",
    "Routing",
    "VARIANTS",
    "checkpoint_filter_fn",
    "choose_experts",
    "count_flops",
    "count_params",
    "expert_load",
    "init_from",
    "load_balancing_loss",
    "profile_model",
    "remap_state_dict",
    "upcycle_dense_state_dict",
]
