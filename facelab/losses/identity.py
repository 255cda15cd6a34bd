"""Identity loss: one minus the cosine similarity of face-recognition embeddings."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def identity_cosine(reference: Tensor, predicted: Tensor) -> Tensor:
    """1 - cos(reference, predicted) per sample, then the batch mean. reference, predicted:
    (B,D) embeddings (any scale); the reference is detached (the input photo's identity is a
    target, not something to change)."""
    return (1.0 - F.cosine_similarity(reference.detach(), predicted, dim=-1, eps=1e-8)).mean()


def composite(render: Tensor, image: Tensor, coverage: Tensor) -> Tensor:
    """The render pasted over the input where the mesh covers it, so the identity network sees a
    whole face photo rather than a face on black. render, image: (B,3,H,W); coverage: (B,1,H,W)
    or (B,H,W) in [0,1], detached."""
    if coverage.ndim == 3:
        coverage = coverage[:, None]
    coverage = coverage.detach().to(render)
    return coverage * render + (1.0 - coverage) * image
