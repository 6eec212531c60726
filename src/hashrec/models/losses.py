"""Training losses: masked per-action binary cross-entropy, plus a regression loss for
continuous heads (dwell time), as Phoenix trains its ranker; the two-tower retriever's sampled
softmax with in-batch negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hashrec.models.ranker import RankerOutput

__all__ = [
    "LossTerms",
    "in_batch_logits",
    "loss_terms",
    "pairwise_loss",
    "pairwise_terms",
    "ranking_loss",
    "retrieval_loss",
]


@dataclass(frozen=True)
class LossTerms:
    """The sums and counts a ranking loss is made of, before dividing.

    Data-parallel training adds the counts over processes first, so that N processes on one
    global batch compute the loss of that whole batch (``hashrec.training.distributed``).
    All four are 0-d float32 tensors; the sums carry gradients.

    >>> t = LossTerms(torch.tensor(6.0), torch.tensor(4.0), torch.tensor(2.0), torch.tensor(2.0))
    >>> float(t.loss(continuous_weight=0.5))  # 6/4 + 0.5 * 2/2
    2.0
    >>> float(t.loss(0.5, bce_count=torch.tensor(8.0)))  # the counts of a global batch
    1.25
    """

    bce_sum: torch.Tensor
    bce_count: torch.Tensor
    abs_err_sum: torch.Tensor
    abs_err_count: torch.Tensor

    def loss(
        self,
        continuous_weight: float = 0.1,
        bce_count: torch.Tensor | None = None,
        abs_err_count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean BCE + ``continuous_weight`` * mean abs error; counts overridable (global ones)."""
        bce_count = self.bce_count if bce_count is None else bce_count
        abs_err_count = self.abs_err_count if abs_err_count is None else abs_err_count
        bce = self.bce_sum / bce_count.clamp(min=1.0)
        return bce + continuous_weight * self.abs_err_sum / abs_err_count.clamp(min=1.0)


def ranking_loss(
    output: RankerOutput,
    labels: torch.Tensor,
    label_mask: torch.Tensor | None = None,
    continuous_targets: torch.Tensor | None = None,
    continuous_weight: float = 0.1,
    action_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean BCE over (valid candidate, action) pairs, plus ``continuous_weight`` * mean abs error.

    ``loss_terms(...).loss(continuous_weight)``: the sums and counts are kept apart there.

    Args:
        output: the ranker's output; padding candidates (``candidate_mask`` False) never count.
        labels: [B, C, A] in {0, 1}.
        label_mask: optional [B, C, A] bool; False drops an entry (e.g. negative-feedback
            actions on sampled negatives, which were never shown).
        continuous_targets: [B, C, Ac] for the continuous heads, when the model has them.
        action_weights: optional [A] weight of each action's BCE (e.g. > 1 for rare actions);
            the loss stays normalised by the number of valid entries.

    >>> mask = torch.tensor([[True, False]])
    >>> out = RankerOutput(torch.zeros(1, 2, 1), torch.zeros(1, 2, 0), mask)
    >>> round(float(ranking_loss(out, torch.ones(1, 2, 1))), 4)  # only the valid candidate counts
    0.6931
    """
    terms = loss_terms(output, labels, label_mask, continuous_targets, action_weights)
    return terms.loss(continuous_weight)


def loss_terms(
    output: RankerOutput,
    labels: torch.Tensor,
    label_mask: torch.Tensor | None = None,
    continuous_targets: torch.Tensor | None = None,
    action_weights: torch.Tensor | None = None,
) -> LossTerms:
    """Sums and counts of ``ranking_loss`` (same arguments, shapes and checks)."""
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
    aw = 1.0
    if action_weights is not None:
        if action_weights.shape != (logits.shape[-1],):
            raise ValueError(
                f"action_weights has shape {list(action_weights.shape)}, expected "
                f"[{logits.shape[-1]}]"
            )
        aw = action_weights.to(bce.device, bce.dtype)
    bce = bce * aw
    zero = logits.new_zeros((), dtype=torch.float32)
    err_sum, err_count = zero, zero  # no continuous head: the regression term adds exactly 0
    Ac = output.continuous.shape[-1]
    if Ac and continuous_targets is not None:
        if continuous_targets.shape != output.continuous.shape:
            raise ValueError(
                f"continuous_targets has shape {list(continuous_targets.shape)}, expected "
                f"{list(output.continuous.shape)}"
            )
        cm = output.candidate_mask[..., None].float()
        err = (output.continuous.float() - continuous_targets.float()).abs() * cm
        err_sum, err_count = err.sum(), cm.sum() * Ac
    return LossTerms((bce * w).sum(), w.sum(), err_sum, err_count)


def pairwise_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """Mean logistic loss of every (positive, negative) pair of candidates in one group
    (``pairwise_terms``' sum over its count).

    For each action, every candidate i with label 1 and candidate j with label 0 of the same
    group (a user) adds ``softplus(s_j - s_i)``: the loss a user's per-user AUC (GAUC) asks for.
    Pointwise cross-entropy learns mostly what separates users; this term learns what separates
    one user's candidates, across slates and histories.

    Args:
        logits, labels: [B, C, A]; mask: [B, C, A] bool (False: no loss on that entry).
        groups: [B, C] int64 group of each candidate (e.g. its user); -1 = in no group.

    Returns a 0-d float32 tensor (0 when no pair exists).

    >>> s = torch.tensor([[[2.0], [0.0], [5.0]]])  # one request, 3 candidates, 1 action
    >>> y = torch.tensor([[[1.0], [0.0], [0.0]]])
    >>> g = torch.tensor([[7, 7, 8]])  # the third candidate belongs to another user
    >>> round(float(pairwise_loss(s, y, torch.ones_like(y, dtype=torch.bool), g)), 4)
    0.1269
    """
    total, n = pairwise_terms(logits, labels, mask, groups)
    return total / n.clamp(min=1)


def pairwise_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairwise_loss``'s sum over the pairs (0-d float32, connected to ``logits``) and the
    pair count (0-d int64): what a multi-process step sums over ranks before dividing."""
    if labels.shape != logits.shape or mask.shape != logits.shape:
        raise ValueError(f"labels {list(labels.shape)} and mask {list(mask.shape)} must have the "
                         f"logits' shape {list(logits.shape)}")  # fmt: skip
    if groups.shape != logits.shape[:2]:
        raise ValueError(f"groups has shape {list(groups.shape)}, expected "
                         f"{list(logits.shape[:2])}")  # fmt: skip
    A = logits.shape[-1]
    keep = (groups.reshape(-1) >= 0) & mask.reshape(-1, A).any(-1)  # candidates in a group
    g = groups.reshape(-1)[keep]
    order = torch.argsort(g, stable=True)  # each group's candidates side by side
    s = logits.reshape(-1, A)[keep][order].float()  # [N, A]
    y = labels.reshape(-1, A)[keep][order]
    m = mask.reshape(-1, A)[keep][order]
    # every (i, j) of one group, as index pairs: sum over groups of size^2, never N x N
    _, sizes = torch.unique_consecutive(g[order], return_counts=True)
    size = sizes.repeat_interleave(sizes)  # [N]: the size of each candidate's group
    start = (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)  # [N]: where it begins
    i = torch.arange(len(size), device=g.device).repeat_interleave(size)  # [P]
    first = torch.cumsum(size, 0) - size  # [N]: where candidate i's pairs begin in [P]
    j = start[i] + torch.arange(len(i), device=g.device) - first.repeat_interleave(size)
    pairs = (m[i] & (y[i] > 0.5)) & (m[j] & (y[j] < 0.5))  # [P, A]: positive i, negative j
    return F.softplus(s[j] - s[i])[pairs].sum(), pairs.sum()


def in_batch_logits(
    users: torch.Tensor,
    items: torch.Tensor,
    temperature: torch.Tensor | float,
    item_keys: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of every user against every in-batch positive: [B, B], the target on the diagonal.

    ``users`` [B, D] and ``items`` [B, D] are unit vectors (row i: a user and the post they
    engaged with). ``logits[i, j] = <u_i, v_j> / temperature - log_q[j]``: the log-Q correction
    (Yi et al., RecSys 2019) removes the popularity bias of in-batch sampling, since a popular
    post is a negative in many more batches. Where column j holds the same post as row i's
    positive (``item_keys[j] == item_keys[i]``, j != i) the logit is -inf: a user's positive is
    never one of their negatives.
    """
    B, D = users.shape
    if items.shape != (B, D):
        raise ValueError(f"items has shape {list(items.shape)}, expected {[B, D]}")
    if item_keys.shape != (B,):
        raise ValueError(f"item_keys has shape {list(item_keys.shape)}, expected {[B]}")
    logits = users.float() @ items.float().T / temperature  # [B, B]
    if log_q is not None:
        if log_q.shape != (B,):
            raise ValueError(f"log_q has shape {list(log_q.shape)}, expected {[B]}")
        logits = logits - log_q.float()[None, :]
    same = item_keys[:, None] == item_keys[None, :]
    same.fill_diagonal_(False)
    return logits.masked_fill(same, float("-inf"))


def retrieval_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    temperature: torch.Tensor | float,
    item_keys: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax (InfoNCE) with in-batch negatives: mean cross-entropy of the diagonal.

    Shapes as ``in_batch_logits``. Every row keeps its own positive, so the loss is finite.

    >>> u = torch.eye(2)
    >>> round(float(retrieval_loss(u, u, 1.0, torch.tensor([7, 8]))), 4)
    0.3133
    >>> float(retrieval_loss(u, u, 1.0, torch.tensor([7, 7])))  # same post: no negative left
    0.0
    """
    logits = in_batch_logits(users, items, temperature, item_keys, log_q)
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, target)
