"""Training losses: masked per-action binary cross-entropy, plus a regression loss for
continuous heads (dwell time), as Phoenix trains its ranker."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hashrec.models.ranker import RankerOutput

__all__ = ["ranking_loss"]


def ranking_loss(
    output: RankerOutput,
    labels: torch.Tensor,
    label_mask: torch.Tensor | None = None,
    continuous_targets: torch.Tensor | None = None,
    continuous_weight: float = 0.1,
) -> torch.Tensor:
    """Mean BCE over (valid candidate, action) pairs, plus ``continuous_weight`` * mean abs error.

    Args:
        output: the ranker's output; padding candidates (``candidate_mask`` False) never count.
        labels: [B, C, A] in {0, 1}.
        label_mask: optional [B, C, A] bool; False drops an entry (e.g. negative-feedback
            actions on sampled negatives, which were never shown).
        continuous_targets: [B, C, Ac] for the continuous heads, when the model has them.

    >>> mask = torch.tensor([[True, False]])
    >>> out = RankerOutput(torch.zeros(1, 2, 1), torch.zeros(1, 2, 0), mask)
    >>> round(float(ranking_loss(out, torch.ones(1, 2, 1))), 4)  # only the valid candidate counts
    0.6931
    """
    logits = output.logits
    if labels.shape != logits.shape:
        raise ValueError(f"labels has shape {list(labels.shape)}, expected {list(logits.shape)}")
    mask = output.candidate_mask[..., None].expand_as(logits)
    if label_mask is not None:
        if label_mask.shape != logits.shape:
            raise ValueError(
                f"label_mask has shape {list(label_mask.shape)}, expected {list(logits.shape)}"
            )
        mask = mask & label_mask.bool()
    w = mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    loss = (bce * w).sum() / w.sum().clamp(min=1.0)
    Ac = output.continuous.shape[-1]
    if Ac and continuous_targets is not None:
        if continuous_targets.shape != output.continuous.shape:
            raise ValueError(
                f"continuous_targets has shape {list(continuous_targets.shape)}, expected "
                f"{list(output.continuous.shape)}"
            )
        cm = output.candidate_mask[..., None].float()
        err = (output.continuous.float() - continuous_targets.float()).abs() * cm
        loss = loss + continuous_weight * err.sum() / (cm.sum() * Ac).clamp(min=1.0)
    return loss
