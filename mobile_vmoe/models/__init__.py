"""Model families. Importing this package registers every model with timm."""

from .init_from import init_from
from .limoe import (
    IMAGE_TEXT_VARIANTS,
    ImageTextOutput,
    ImageTextTransformer,
    ModalityRouting,
    flops_per_example,
)
from .limoe_losses import ContrastiveObjective, global_entropy, local_entropy
from .moe import ExpertMlp, MoEBlock, Router, Routing, choose_experts, expert_load, load_balancing_loss
from .profile import ModelProfile, count_flops, count_params, profile_model
from .token_moe import TokenExpertMlp, TokenMoEMlp, TokenRouter, TokenRouting, routing_stats
from .vit import VARIANTS, MobileVMoE, checkpoint_filter_fn, remap_state_dict, upcycle_dense_state_dict
from .vmoe import TOKEN_VARIANTS, TokenVMoE

__all__ = [
    "ContrastiveObjective",
    "global_entropy",
    "local_entropy",
    "IMAGE_TEXT_VARIANTS",
    "ImageTextOutput",
    "ImageTextTransformer",
    "ModalityRouting",
    "flops_per_example",
    "ExpertMlp",
    "MoEBlock",
    "MobileVMoE",
    "ModelProfile",
    "Router",
    "Routing",
    "TOKEN_VARIANTS",
    "TokenExpertMlp",
    "TokenMoEMlp",
    "TokenRouter",
    "TokenRouting",
    "TokenVMoE",
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
    "routing_stats",
    "upcycle_dense_state_dict",
]
