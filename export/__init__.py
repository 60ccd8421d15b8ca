"""Export stage: ExecuTorch .pte, Core ML .mlpackage and ONNX, verified against eager PyTorch."""
