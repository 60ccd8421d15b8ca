"""Caption tokenizer of the image-text models: open_clip's CLIP BPE tokenizer (its vocabulary ships in the wheel,
so no download), with the counts a data report needs.

Every caption becomes ``[SOT, BPE tokens..., EOT]`` padded with 0 to the context length L; a longer caption is cut
and ends in EOT (open_clip's truncation), so the text model can pool at EOT, the largest id in every row.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from open_clip.tokenizer import SimpleTokenizer

__all__ = ["PAD_ID", "SAMPLE_CAPTIONS", "TokenBatch", "Tokenizer", "text_mask"]

PAD_ID = 0
# Captions of one word to longer than a nano context: what export verifies a text encoder on besides the zero-shot
# prompts, and what `mobile-vmoe bench` feeds one.
SAMPLE_CAPTIONS = (
    "a cat",
    "a photo of a dog playing in the snow",
    "two red circles on a blue background",
    "a small green square in the upper left corner of a dark image",
    "a close-up of a yellow triangle",
    "an empty street at night with a few lights and one parked car under a tree next to an old house",
    "this is a picture of something",
    "stripes",
)


class TokenBatch(NamedTuple):
    tokens: torch.Tensor  # [B, L] int64, PAD_ID after EOT
    truncated: int  # captions cut at the context length
    empty: int  # captions with no token left after cleaning (whitespace, emoji-only, ...)


class Tokenizer:
    """``Tokenizer(context_length)(texts) -> TokenBatch``; ids are open_clip's (SOT 49406, EOT 49407)."""

    def __init__(self, context_length: int = 32) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)

    @property
    def vocab_size(self) -> int:
        return self._bpe.vocab_size

    @property
    def sot_id(self) -> int:
        return self._bpe.sot_token_id

    @property
    def eot_id(self) -> int:
        return self._bpe.eot_token_id

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a sequence of captions, not one string: wrap it in a list")
        L = self.context_length
        tokens = torch.zeros(len(texts), L, dtype=torch.long)
        truncated = empty = 0
        for i, text in enumerate(texts):
            ids = self._bpe.encode(text)
            empty += not ids
            truncated += len(ids) + 2 > L
            row = [self._bpe.sot_token_id, *ids[: L - 2], self._bpe.eot_token_id]
            tokens[i, : len(row)] = torch.tensor(row)
        return TokenBatch(tokens, truncated, empty)

    def decode(self, tokens: torch.Tensor) -> str:
        """One row of ids -> its text, without SOT, EOT and padding."""
        special = {PAD_ID, self._bpe.sot_token_id, self._bpe.eot_token_id}
        return self._bpe.decode([int(t) for t in tokens if int(t) not in special]).strip()


def text_mask(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, L] -> [B, L] bool, True at real tokens (SOT through EOT), False at padding."""
    return tokens != PAD_ID
