"""Export stage: ExecuTorch .pte, Core ML .mlpackage and ONNX, verified against eager PyTorch.

    from mobile_vmoe.export import export_model
    export_model("pte", "model.pte", checkpoint="runs/moe/model.safetensors", quantize="int8")

Every export is run where it can run here (ExecuTorch runtime, ONNX Runtime) on real images and compared with
eager PyTorch; Core ML, which cannot predict on Linux, is checked structurally (the MIL program gathers the
stacked expert weights and holds no per-expert copies of the MLP). The artifact appears at its path only after
the check passed, with a ``FILE.<ext>.json`` sidecar such as ``model.pte.json`` (model, routing, precision,
parity, size, library versions; docs/FILES.md).
An image-text checkpoint (LIMoE, one-tower, CLIP) exports as a zero-shot classifier (its class-prompt embeddings
baked in) or, with ``part="text"``, as its text encoder (``image_text.py``).
CLI: ``mobile-vmoe export --checkpoint CKPT --format pte|coreml|onnx [--quantize int8] [--part image|text]
[--out FILE]``.
"""

from .core import DEFAULT_NUM_VERIFY, FORMATS, export_model
from .verify import VerificationError

__all__ = ["export_model", "VerificationError", "FORMATS", "DEFAULT_NUM_VERIFY"]
