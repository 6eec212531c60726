"""Request and response models of the HTTP service, built from the model and the limits.

The models are made per app (``build_schemas``) so the limits and the model's own action names
and surface count land in the validation and in the OpenAPI schema: a client reads every bound
from ``/openapi.json``. Validation is strict: integers must be JSON integers (no strings, floats,
booleans, NaN), unknown fields are refused, IDs lie in ``1 .. max_id``.

(No ``from __future__ import annotations`` here: pydantic resolves the annotations of these
function-local classes at class creation.)
"""

from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

__all__ = ["Limits", "Schemas", "SideFields", "build_schemas"]

INT64_MAX = 2**63 - 1
TIME_MS_MAX = 4_102_444_800_000  # 2100-01-01 UTC: as the log reader's bound


@dataclass(frozen=True)
class SideFields:
    """What a request must carry for a ranker with side features (``SideStore``): the history
    events' signal columns, ``required`` (only the client knows them, e.g. play time) and
    ``optional`` (default: the post's own value, e.g. its duration), and whether the request
    needs ``time_ms`` (the candidates' ages at their impression).

    >>> SideFields(required=("play_time_ms",), optional=("duration_ms",), time=True).columns
    ('play_time_ms', 'duration_ms')
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    time: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)

    def describe(self) -> dict[str, Any]:
        return {"history_signals_required": list(self.required),
                "history_signals_optional": list(self.optional),
                "time_ms_required": self.time}  # fmt: skip


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
    side: SideFields | None = None,
) -> Schemas:
    """Pydantic models for ``limits`` and a model with ``actions`` and ``num_surfaces``; with
    ``corpus_size`` (a retriever is served) also /recommend's, k bounded by
    ``min(limits.max_k, corpus_size)``; with ``side`` (a ranker with side features) the history
    events' ``signals`` and the request's impression time ``time_ms``."""
    Id = Annotated[int, Field(ge=1, le=limits.max_id, description="raw ID, as in training")]
    Surface = Annotated[int, Field(ge=0, le=num_surfaces - 1, description="product surface")]
    Action = Literal.__getitem__(tuple(actions))
    num_actions = len(actions)  # (a class body cannot see ``actions``: it has a field so named)
    TimeMs = Annotated[int, Field(ge=0, le=TIME_MS_MAX, description="epoch milliseconds")]
    side = side or SideFields()
    Value = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    signal_fields: dict[str, Any] = {}
    for i, col in enumerate(side.columns):
        if i < len(side.required):
            spec = (Value, Field(alias=col, description="the event's raw value, as in the log"))
        else:
            spec = (Value | None, Field(default=None, alias=col, description="the event's raw "
                                        "value (default: the post's own)"))  # fmt: skip
        signal_fields[f"s{i}"] = spec  # by alias: a column name need not be an identifier
    Signals = (
        create_model("HistorySignals", __config__=_STRICT, **signal_fields)
        if signal_fields else None
    )  # fmt: skip
    signals_field: dict[str, Any] = {}
    if Signals is not None:
        signals_field["signals"] = (
            (Signals, Field(description="the event's signals (side features)"))
            if side.required
            else (Signals | None, Field(default=None, description="the event's signals"))
        )
    time_field: dict[str, Any] = {}
    if side.time:
        time_field["time_ms"] = (TimeMs, Field(description="when the posts are shown (their "
                                               "age), epoch ms"))  # fmt: skip

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

    if signals_field:
        HistoryEvent = create_model(  # type: ignore[misc]
            "HistoryEvent", __base__=HistoryEvent, __doc__=HistoryEvent.__doc__, **signals_field
        )

    class Candidate(BaseModel):
        """A post to score."""

        model_config = _STRICT
        post_id: Id
        author_id: Id
        surface: Surface = 0

    if side.time:
        Candidate = create_model(  # type: ignore[misc]
            "Candidate", __base__=Candidate, __doc__=Candidate.__doc__,
            time_ms=(TimeMs | None, Field(default=None, description="this candidate's "
                     "impression time (default: the request's time_ms)")),
        )  # fmt: skip

    class RankRequest(BaseModel):
        """A user, the user's history (oldest first) and the candidates to score."""

        model_config = _STRICT
        user_id: Id
        history: list[HistoryEvent] = Field(default_factory=list, max_length=max_history)
        candidates: list[Candidate] = Field(min_length=1, max_length=limits.max_candidates)

    if side.time:
        # the request's time, or every candidate's own: either way each candidate has one
        timed = {"required": ["time_ms"], "properties": {"time_ms": {"type": "integer"}}}
        each = {"properties": {"candidates": {"items": timed}}}

        class RankRequest(RankRequest):  # type: ignore[no-redef]
            """A user, the user's history (oldest first) and the candidates to score."""

            model_config = ConfigDict(**_STRICT, json_schema_extra={"anyOf": [timed, each]})
            time_ms: TimeMs | None = Field(  # type: ignore[valid-type]
                default=None,
                validate_default=True,
                description="when the posts are shown (their age), epoch ms; required unless "
                "every candidate has its own time_ms",
            )

            @field_validator("time_ms")
            @classmethod
            def _time_for_every_candidate(cls, v: int | None, info: Any) -> int | None:
                cands = info.data.get("candidates")  # absent when they failed validation
                if v is None and cands is not None and any(c.time_ms is None for c in cands):
                    raise ValueError("time_ms is required unless every candidate has its own "
                                     "time_ms (the posts' ages at the impression)")  # fmt: skip
                return v

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
        side_features: dict[str, Any] | None = Field(
            default=None, description="what requests carry for the ranker's side features"
        )

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

    if time_field:
        RecommendRequest = create_model(  # type: ignore[misc]
            "RecommendRequest", __base__=RecommendRequest, __doc__=RecommendRequest.__doc__,
            **time_field,
        )  # fmt: skip

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
