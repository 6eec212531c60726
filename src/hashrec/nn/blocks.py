"""Block reducers: the k hash vectors of each entity (plus actions and surface) -> one token.

Mirrors Phoenix's ``block_user_reduce`` / ``block_history_reduce`` / ``block_candidate_reduce``:
concatenate the per-hash vectors, project with ``proj_mat_1/3/2`` back to D. Masks come from the
first hash only (True = valid), as in Phoenix: hash 0 of a real ID is never 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "NUM_PRODUCT_SURFACES",
    "ActionEmbedding",
    "BlockCandidateReduce",
    "BlockHistoryReduce",
    "BlockUserReduce",
    "padding_mask",
]

NUM_PRODUCT_SURFACES = 16  # Phoenix's product_surface_embedding_table vocabulary


def padding_mask(hashes: torch.Tensor) -> torch.Tensor:
    """hashes [..., K] -> bool [...], True where the entity is present (first hash != 0)."""
    return hashes[..., 0] != 0


def _proj(in_dim: int, out_dim: int) -> nn.Parameter:
    # Fan-in scaled so the projected token has the scale of one embedding vector.
    return nn.Parameter(torch.randn(in_dim, out_dim) / in_dim**0.5)


def _flat_post_author(
    block: nn.Module, what: str, post: torch.Tensor, author: torch.Tensor, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Check (Kp, Ka, D) against the block; [B, L, K, D] -> [B, L, Kp*D] and [B, L, Ka*D]."""
    B, L, Kp, D = post.shape
    Ka = author.shape[2]
    expected = (block.num_item_hashes, block.num_author_hashes, block.emb_size)
    if (Kp, Ka, D) != expected:
        raise ValueError(f"{what} embeddings have (Kp, Ka, D) = {(Kp, Ka, D)}, expected {expected}")
    return [post.reshape(B, L, Kp * D).to(dtype), author.reshape(B, L, Ka * D).to(dtype)]


def _check_extra(block: nn.Module, extra: Sequence[torch.Tensor]) -> None:
    if len(extra) != block.num_extra:
        raise ValueError(
            f"{type(block).__name__} expects {block.num_extra} extra parts, got {len(extra)}"
        )


class ActionEmbedding(nn.Module):
    """Signed multi-hot actions -> one vector: ``(2a - 1) @ action_projection``, 0 if no action.

    actions [..., A] (bool/int/float in [0, 1]) -> [..., D].

    >>> act = ActionEmbedding(num_actions=3, dim=4)
    >>> out = act(torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    >>> out.shape, bool(out[1].eq(0).all())  # no action set -> zero vector
    (torch.Size([2, 4]), True)
    """

    def __init__(self, num_actions: int, dim: int) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.action_projection = nn.Parameter(torch.randn(num_actions, dim) / num_actions**0.5)

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        A = actions.shape[-1]
        if A != self.num_actions:
            raise ValueError(f"actions has {A} actions, expected {self.num_actions}")
        a = actions.to(self.action_projection.dtype)
        emb = (2 * a - 1) @ self.action_projection  # [..., D]
        return emb * (a != 0).any(dim=-1, keepdim=True)


class BlockUserReduce(nn.Module):
    """[B, Ku, D] user hash vectors -> user token [B, 1, D] and mask [B, 1].

    >>> red = BlockUserReduce(num_hashes=2, emb_size=8)
    >>> tok, mask = red(torch.tensor([[5, 9]]), torch.randn(1, 2, 8))
    >>> tok.shape, mask.tolist()
    (torch.Size([1, 1, 8]), [[True]])
    """

    def __init__(self, num_hashes: int, emb_size: int) -> None:
        super().__init__()
        self.num_hashes, self.emb_size = num_hashes, emb_size
        self.proj_mat_1 = _proj(num_hashes * emb_size, emb_size)

    def forward(
        self, user_hashes: torch.Tensor, user_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, K, D = user_embeddings.shape
        if K != self.num_hashes or D != self.emb_size:
            raise ValueError(
                f"user_embeddings has shape {[B, K, D]}, expected [B, {self.num_hashes}, "
                f"{self.emb_size}]"
            )
        x = user_embeddings.reshape(B, 1, K * D)  # [B, 1, K*D]
        return x.to(self.proj_mat_1.dtype) @ self.proj_mat_1, padding_mask(user_hashes).view(B, 1)


class BlockHistoryReduce(nn.Module):
    """History events -> tokens [B, S, D] and mask [B, S].

    concat(post [Kp*D], author [Ka*D], action [D], surface [D], *extra [D each]) @ ``proj_mat_3``
    (``num_extra`` further [B, S, D] parts, e.g. Phoenix's dwell-time embedding). Owns the
    signed multi-hot ``action_projection`` and the ``product_surface_embedding_table`` (pass it to
    ``BlockCandidateReduce`` to share it, as Phoenix does).

    ``forward`` takes its arguments in the order of Phoenix's ``block_history_reduce`` and of the
    lecture notebook: hashes, post vectors, author vectors, **surface, then actions**. A call with
    the last two swapped is caught by shape (surface is [B, S], actions [B, S, A]).

    >>> red = BlockHistoryReduce(num_item_hashes=2, num_author_hashes=2, emb_size=8)
    >>> h = torch.tensor([[[1, 2], [0, 0]]])  # one user, S = 2, second event is padding
    >>> surface = torch.zeros(1, 2, dtype=torch.long)  # [B, S]
    >>> actions = torch.zeros(1, 2, 19)  # [B, S, A]
    >>> tok, mask = red(h, torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), surface, actions)
    >>> tok.shape, mask.tolist()
    (torch.Size([1, 2, 8]), [[True, False]])
    """

    def __init__(
        self,
        num_item_hashes: int,
        num_author_hashes: int,
        emb_size: int,
        num_actions: int = 19,
        num_surfaces: int = NUM_PRODUCT_SURFACES,
        num_extra: int = 0,
    ) -> None:
        super().__init__()
        self.num_item_hashes, self.num_author_hashes = num_item_hashes, num_author_hashes
        self.emb_size, self.num_extra = emb_size, num_extra
        self.actions = ActionEmbedding(num_actions, emb_size)
        self.product_surface_embedding_table = nn.Embedding(num_surfaces, emb_size)
        nn.init.normal_(self.product_surface_embedding_table.weight, std=emb_size**-0.5)
        parts = num_item_hashes + num_author_hashes + 2 + num_extra
        self.proj_mat_3 = _proj(parts * emb_size, emb_size)

    @property
    def action_projection(self) -> nn.Parameter:
        return self.actions.action_projection

    def forward(
        self,
        history_post_hashes: torch.Tensor,
        history_post_embeddings: torch.Tensor,
        history_author_embeddings: torch.Tensor,
        history_product_surface: torch.Tensor,
        history_actions: torch.Tensor,
        extra: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce S history events to S tokens.

        Args:
            history_post_hashes: [B, S, Kp] int; 0 = padding event.
            history_post_embeddings: [B, S, Kp, D].
            history_author_embeddings: [B, S, Ka, D].
            history_product_surface: [B, S] int surface index per event.
            history_actions: [B, S, A] multi-hot (bool, int or float in [0, 1]).
            extra: ``num_extra`` further [B, S, D] parts (keyword), e.g. dwell-time embeddings.

        Returns:
            tokens [B, S, D] and mask [B, S] bool (True = valid event).
        """
        B, S, Kp, D = history_post_embeddings.shape
        _check_surface_and_actions(
            (B, S), history_product_surface, history_actions, self.actions.num_actions
        )
        _check_extra(self, extra)
        x = torch.cat(
            [
                *_flat_post_author(
                    self,
                    "history",
                    history_post_embeddings,
                    history_author_embeddings,
                    self.proj_mat_3.dtype,
                ),
                self.actions(history_actions),
                self.product_surface_embedding_table(history_product_surface),
                *(e.to(self.proj_mat_3.dtype) for e in extra),
            ],
            dim=-1,
        )  # [B, S, (Kp+Ka+2+extra)*D]
        return x @ self.proj_mat_3, padding_mask(history_post_hashes)


_ORDER_HINT = (
    "forward takes (history_post_hashes, history_post_embeddings, history_author_embeddings, "
    "history_product_surface, history_actions), as Phoenix's block_history_reduce"
)


def _check_surface_and_actions(
    bs: tuple[int, int], surface: torch.Tensor, actions: torch.Tensor, num_actions: int
) -> None:
    """Surface must be int [B, S], actions [B, S, A]; a swapped pair names the right order."""
    B, S = bs
    swapped = surface.dim() == 3 and actions.dim() == 2
    if swapped:
        raise ValueError(
            f"history_product_surface has shape {list(surface.shape)} and history_actions "
            f"{list(actions.shape)}: they look swapped; {_ORDER_HINT}"
        )
    if tuple(surface.shape) != (B, S):
        raise ValueError(
            f"history_product_surface has shape {list(surface.shape)}, expected [{B}, {S}] "
            f"(one surface index per event); {_ORDER_HINT}"
        )
    if surface.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"history_product_surface has dtype {surface.dtype}, expected torch.int32 or "
            f"torch.int64 surface indices; {_ORDER_HINT}"
        )
    if actions.dim() != 3 or tuple(actions.shape[:2]) != (B, S):
        raise ValueError(
            f"history_actions has shape {list(actions.shape)}, expected [{B}, {S}, "
            f"{num_actions}] (multi-hot per event); {_ORDER_HINT}"
        )


class BlockCandidateReduce(nn.Module):
    """Candidates -> tokens [B, C, D] and mask [B, C]: concat(post, author, surface) @ proj_mat_2.

    ``num_extra`` further [B, C, D] parts (e.g. Phoenix's post-age embedding) join the concat.

    Missing from the lecture notebook, present in Phoenix. ``product_surface_embedding_table``
    may be shared with ``BlockHistoryReduce``.

    >>> hist = BlockHistoryReduce(num_item_hashes=2, num_author_hashes=2, emb_size=8)
    >>> cand = BlockCandidateReduce(2, 2, 8, hist.product_surface_embedding_table)
    >>> h = torch.tensor([[[4, 5], [6, 7], [0, 0]]])  # B = 1, C = 3, third slot is padding
    >>> tok, mask = cand(h, torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8),
    ...                  torch.zeros(1, 3, dtype=torch.long))
    >>> tok.shape, mask.tolist()
    (torch.Size([1, 3, 8]), [[True, True, False]])
    """

    def __init__(
        self,
        num_item_hashes: int,
        num_author_hashes: int,
        emb_size: int,
        product_surface_embedding_table: nn.Embedding | None = None,
        num_surfaces: int = NUM_PRODUCT_SURFACES,
        num_extra: int = 0,
    ) -> None:
        super().__init__()
        self.num_item_hashes, self.num_author_hashes = num_item_hashes, num_author_hashes
        self.emb_size, self.num_extra = emb_size, num_extra
        if product_surface_embedding_table is None:
            product_surface_embedding_table = nn.Embedding(num_surfaces, emb_size)
            nn.init.normal_(product_surface_embedding_table.weight, std=emb_size**-0.5)
        self.product_surface_embedding_table = product_surface_embedding_table
        parts = num_item_hashes + num_author_hashes + 1 + num_extra
        self.proj_mat_2 = _proj(parts * emb_size, emb_size)

    def forward(
        self,
        candidate_post_hashes: torch.Tensor,
        candidate_post_embeddings: torch.Tensor,
        candidate_author_embeddings: torch.Tensor,
        candidate_product_surface: torch.Tensor,
        extra: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_extra(self, extra)
        x = torch.cat(
            [
                *_flat_post_author(
                    self,
                    "candidate",
                    candidate_post_embeddings,
                    candidate_author_embeddings,
                    self.proj_mat_2.dtype,
                ),
                self.product_surface_embedding_table(candidate_product_surface),
                *(e.to(self.proj_mat_2.dtype) for e in extra),
            ],
            dim=-1,
        )  # [B, C, (Kp+Ka+1+extra)*D]
        return x @ self.proj_mat_2, padding_mask(candidate_post_hashes)
