"""Zero-shot class embeddings of an image-text model: every class name in every prompt template, encoded, the
templates averaged (CLIP's prompt ensembling). Shared by zero-shot evaluation and the exported classifier, so
the phone compares images with exactly the embeddings evaluation used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .text import Tokenizer

__all__ = ["class_embeddings"]


@torch.no_grad()
def class_embeddings(
    model: nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenizer: Tokenizer | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """[C, P] L2-normalised: the mean over templates of each class's normalised prompt embeddings."""
    if not class_names or not templates:
        raise ValueError("class_embeddings needs at least one class name and one prompt template")
    tok = tokenizer or Tokenizer(model.context_length)
    prompts = [t.format(name) for name in class_names for t in templates]  # class-major: [C * T]
    tokens = tok(prompts).tokens.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        embeds = torch.cat(
            [model.encode_text(tokens[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        )
    finally:
        model.train(was_training)
    mean = embeds.float().reshape(len(class_names), len(templates), -1).mean(dim=1)
    return nn.functional.normalize(mean, dim=-1)
