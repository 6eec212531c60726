"""Request and response models of the HTTP service, built from the model and the limits.

The models are made per app (``build_schemas``) so the limits and the model's own action names
and surface count land in the validation and in the OpenAPI schema: a client reads every bound
from ``/openapi.json``. Validation is strict: integers must be JSON integers (no strings, floats,
booleans, NaN), unknown fields are refused, IDs lie in ``1 .. max_id``.

(No ``from __future__ import annotations`` here: pydantic resolves the annotations of these
function-local classes at class creation.)
"""

from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Limits", "Schemas", "build_schemas"]

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; all configurable (``hashrec serve --max-...``).

    ``max_history`` None means the ranker's own history length (the one it was trained with).

    >>> Limits(max_candidates=100).max_candidates
    100
    """

    max_history: int | None = None
    max_candidates: int = 1000
    max_body_bytes: int = 1 << 20
    max_id: int = INT64_MAX
    max_k: int = 100  # /recommend: posts per answer (and never more than the corpus)
    max_exclude: int = 10_000  # /recommend: exclude_post_ids per request

    def __post_init__(self) -> None:
        if self.max_history is not None and self.max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {self.max_history}")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.max_body_bytes < 64:
            raise ValueError(f"max_body_bytes must be >= 64, got {self.max_body_bytes}")
        if not 1 <= self.max_id <= INT64_MAX:
            raise ValueError(f"max_id must be in 1..2^63-1, got {self.max_id}")
        if self.max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {self.max_k}")
        if self.max_exclude < 0:
            raise ValueError(f"max_exclude must be >= 0, got {self.max_exclude}")


@dataclass(frozen=True)
class Schemas:
    """The pydantic classes of one app.

    >>> s = build_schemas(Limits(max_candidates=2), 4, ("click",), (), 16)
    >>> s.RankRequest.model_validate_json('{"user_id": 1, "candidates": '
    ...     '[{"post_id": 2, "author_id": 3}]}').candidates[0].surface
    0
    """

    HistoryEvent: type[BaseModel]
    Candidate: type[BaseModel]
    RankRequest: type[BaseModel]
    CandidateScore: type[BaseModel]
    RankResponse: type[BaseModel]
    Health: type[BaseModel]
    RecommendRequest: type[BaseModel] | None = None
    RecommendResponse: type[BaseModel] | None = None


_STRICT = ConfigDict(extra="forbid", strict=True)


def build_schemas(
    limits: Limits,
    max_history: int,
    actions: tuple[str, ...],
    continuous_actions: tuple[str, ...],
    num_surfaces: int,
    corpus_size: int | None = None,
) -> Schemas:
    """Pydantic models for ``limits`` and a model with ``actions`` and ``num_surfaces``; with
    ``corpus_size`` (a retriever is served) also /recommend's, k bounded by
    ``min(limits.max_k, corpus_size)``."""
    Id = Annotated[int, Field(ge=1, le=limits.max_id, description="raw ID, as in training")]
    Surface = Annotated[int, Field(ge=0, le=num_surfaces - 1, description="product surface")]
    Action = Literal.__getitem__(tuple(actions))
    num_actions = len(actions)  # (a class body cannot see ``actions``: it has a field so named)

    class HistoryEvent(BaseModel):
        """One earlier impression of the user and what the user did on it."""

        model_config = _STRICT
        post_id: Id
        author_id: Id
        actions: list[Action] = Field(  # type: ignore[valid-type]
            default_factory=list,
            max_length=num_actions,
            json_schema_extra={"uniqueItems": True},
            description="actions the user took on the post (names from the model)",
        )
        surface: Surface = 0

        @field_validator("actions")
        @classmethod
        def _unique(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError("actions lists an action twice")
            return v

    class Candidate(BaseModel):
        """A post to score."""

        model_config = _STRICT
        post_id: Id
        author_id: Id
        surface: Surface = 0

    class RankRequest(BaseModel):
        """A user, the user's history (oldest first) and the candidates to score."""

        model_config = _STRICT
        user_id: Id
        history: list[HistoryEvent] = Field(default_factory=list, max_length=max_history)
        candidates: list[Candidate] = Field(min_length=1, max_length=limits.max_candidates)

    class CandidateScore(BaseModel):
        post_id: int
        score: float = Field(description="weighted score (X's home-mixer rule)")
        probabilities: dict[str, float] = Field(description="per binary action")
        continuous: dict[str, float] = Field(description="per continuous action")

    class RankResponse(BaseModel):
        """Scores in candidate order."""

        candidates: list[CandidateScore]

    class Health(BaseModel):
        status: Literal["ok"]
        actions: list[str]
        continuous_actions: list[str]
        max_history: int
        max_candidates: int
        corpus_size: int | None = Field(default=None, description="/recommend's corpus")
        max_k: int | None = Field(default=None, description="/recommend's largest k")

    schemas = Schemas(HistoryEvent, Candidate, RankRequest, CandidateScore, RankResponse, Health)
    if corpus_size is None:
        return schemas
    max_k = min(limits.max_k, corpus_size)

    class RecommendRequest(BaseModel):
        """A user and the user's history (oldest first): the top k posts of the corpus."""

        model_config = _STRICT
        user_id: Id
        history: list[HistoryEvent] = Field(default_factory=list, max_length=max_history)
        exclude_post_ids: list[Id] = Field(  # type: ignore[valid-type]
            default_factory=list,
            max_length=limits.max_exclude,
            description="posts not to recommend (the history's posts are excluded too)",
        )
        surface: Surface | None = Field(  # type: ignore[valid-type]
            default=None, description="where the feed is served (default: the latest event's)"
        )
        k: int = Field(default=min(20, max_k), ge=1, le=max_k, description="posts to return")

    class Recommendation(BaseModel):
        post_id: int
        author_id: int
        score: float = Field(description="weighted score after author diversity")
        probabilities: dict[str, float] = Field(description="per binary action")
        retrieval_score: float | None = Field(
            description="cosine score of the retriever (null on the cold-start path)"
        )

    class RecommendResponse(BaseModel):
        """Posts best first; ``cold_start`` and ``notice`` tell when the user had neither a
        known ID nor history (the most popular posts were ranked instead)."""

        user_id: int
        items: list[Recommendation]
        cold_start: bool
        notice: str | None

    return replace(schemas, RecommendRequest=RecommendRequest, RecommendResponse=RecommendResponse)
