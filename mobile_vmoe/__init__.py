"""mobile-vmoe: Mobile V-MoE (Daxberger et al., arXiv 2309.04354) from training to on-phone latency."""

import os

# Set in the bench's child process (bench/runtime.py), which times a model file: it needs neither the models nor
# timm, whose import would cost it seconds per file.
BENCH_CHILD_ENV = "MOBILE_VMOE_BENCH_CHILD"

if os.environ.get(BENCH_CHILD_ENV) != "1":
    from . import models  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
