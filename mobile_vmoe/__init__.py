"""mobile-vmoe: Mobile V-MoE (Daxberger et al., arXiv 2309.04354) from training to on-phone latency."""

from . import models  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
