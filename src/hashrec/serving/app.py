"""The HTTP service: ``create_app(ranker, ...)`` builds a FastAPI app (no state at import).

Routes: ``POST /rank`` (raw request -> per-action probabilities and weighted score per candidate,
in candidate order), ``POST /recommend`` when a ``RecommendPipeline`` is given (user + history ->
the top k posts of the corpus: retrieve -> rank -> score), ``GET /healthz``,
``GET /metrics`` (Prometheus text: request counts by route and status, latency histogram, batch
sizes) and FastAPI's ``/openapi.json`` and ``/docs``.

Bad input never reaches the model: bodies over ``max_body_bytes`` get 413 before they are read
in full; malformed JSON, wrong types, out-of-range or non-integer numbers (NaN, 1e400, -1, 2^64),
unknown fields and oversized lists get 422 from the strict pydantic models; a full queue gets
429. Concurrent ``/rank`` requests are micro-batched (``batcher.py``); ``/recommend`` requests
run one at a time in their own worker (each answer is exactly ``pipeline.recommend``'s).
Shutdown (uvicorn's, on SIGINT/SIGTERM) stops accepting, lets in-flight requests finish, then
stops the batchers.

(No ``from __future__ import annotations``: FastAPI reads the endpoint annotations, which name
classes built per app.)
"""

import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hashrec.serving.batcher import BatchConfig, MicroBatcher, QueueFull
from hashrec.serving.pipeline import RecommendPipeline, RecommendResult, UserRequest
from hashrec.serving.rank import RankQuery, RankResult, RequestRanker
from hashrec.serving.schemas import Limits, SideFields, build_schemas

__all__ = ["ServeConfig", "create_app"]

# Latency histogram bucket bounds in seconds (Prometheus convention: cumulative, plus +Inf).
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of one app.

    >>> ServeConfig(limits=Limits(max_candidates=100)).limits.max_candidates
    100
    """

    limits: Limits = field(default_factory=Limits)
    batching: BatchConfig = field(default_factory=BatchConfig)


class _Metrics:
    """Request counts and latencies by route and status, rendered as Prometheus text."""

    def __init__(self, routes: tuple[str, ...]) -> None:
        self.routes = routes
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.in_flight = 0
        self.in_flight_by_route: dict[str, int] = dict.fromkeys((*routes, "other"), 0)

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"  # bounded label set

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.counts[(route, status)] = self.counts.get((route, status), 0) + 1
        b = self.buckets.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                b[i] += 1
        b[-1] += 1
        self.sums[route] = self.sums.get(route, 0.0) + seconds

    def render(self, batcher: MicroBatcher) -> str:
        lines = [
            "# HELP hashrec_requests_total HTTP requests by route and status.",
            "# TYPE hashrec_requests_total counter",
        ]
        for (route, status), n in sorted(self.counts.items()):
            lines.append(f'hashrec_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP hashrec_request_seconds HTTP request latency (first byte in to last byte out).",
            "# TYPE hashrec_request_seconds histogram",
        ]
        for route, b in sorted(self.buckets.items()):
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), b, strict=True):
                le = "+Inf" if bound == math.inf else repr(bound)
                lines.append(f'hashrec_request_seconds_bucket{{route="{route}",le="{le}"}} {n}')
            lines.append(f'hashrec_request_seconds_sum{{route="{route}"}} {self.sums[route]:.6f}')
            lines.append(f'hashrec_request_seconds_count{{route="{route}"}} {b[-1]}')
        lines += [
            "# TYPE hashrec_requests_in_flight gauge",
            f"hashrec_requests_in_flight {self.in_flight}",
            "# TYPE hashrec_model_batches_total counter",
            f"hashrec_model_batches_total {batcher.batches}",
            "# TYPE hashrec_model_batch_items_total counter",
            f"hashrec_model_batch_items_total {batcher.items}",
            "# TYPE hashrec_queue_waiting gauge",
            f"hashrec_queue_waiting {batcher.waiting}",
        ]
        return "\n".join(lines) + "\n"


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class _Guard:
    """Outermost ASGI layer: body-size limit, in-flight count, per-route metrics."""

    def __init__(self, app: ASGIApp, limit: int, metrics: _Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app dies before answering
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        route = self.metrics.route(scope["path"])
        self.metrics.in_flight += 1
        self.metrics.in_flight_by_route[route] += 1
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                await _plain(send_status, 413, f"request body larger than {self.limit} bytes")
                return
            seen = 0

            async def limited() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:  # chunked bodies: count as they come
                        raise _BodyTooLarge(self.limit)
                return message

            try:
                await self.app(scope, limited, send_status)
            except _BodyTooLarge:
                if not started:
                    await _plain(send_status, 413, f"request body larger than {self.limit} bytes")
        finally:
            self.metrics.in_flight -= 1
            self.metrics.in_flight_by_route[route] -= 1
            self.metrics.observe(route, status, time.perf_counter() - start)


async def _plain(send: Callable[[Message], Awaitable[None]], status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _invalid(errors: Sequence[Any], prefix: tuple[str, ...]) -> JSONResponse:
    """422 naming where and what, never echoing the input: FastAPI's own handler does, and the
    input may be NaN or Infinity (not JSON: rendering it would fail with a 500) or megabytes."""
    detail = [
        {
            "loc": [*prefix, *(str(x) for x in e.get("loc", ()))],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _json_only(request: Request) -> None:
    ctype = request.headers.get("content-type", "application/json")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, f"expected content-type application/json, got {ctype!r}")


def _request_body(name: str) -> dict[str, Any]:
    """OpenAPI requestBody naming a component schema (the routes read the raw body)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "body too large"},
    415: {"description": "not JSON"},
    422: {"description": "invalid request"},
    429: {"description": "busy"},
}


def create_app(
    ranker: RequestRanker,
    config: ServeConfig | None = None,
    pipeline: RecommendPipeline | None = None,
    known_users: np.ndarray | None = None,
) -> FastAPI:
    """A FastAPI app serving ``ranker`` under ``config``'s limits and batching.

    With ``pipeline`` it also serves ``POST /recommend`` (absent otherwise: 404, and not in the
    OpenAPI schema). ``known_users`` (IDs, e.g. the users of the corpus's log) decides which
    user IDs the pipeline treats as known; an ID outside it with no history takes the
    cold-start path. None: every user ID is known.

    Run it with uvicorn, e.g. ``uvicorn.run(create_app(ranker), port=8000)``.
    """
    config = config or ServeConfig()
    limits = config.limits
    max_history = ranker.history_len if limits.max_history is None else limits.max_history
    if max_history > ranker.history_len:
        raise ValueError(
            f"max_history {max_history} exceeds the ranker's history_len {ranker.history_len}"
        )
    mcfg = ranker.model.config
    if pipeline is not None and tuple(pipeline.actions) != tuple(mcfg.actions):
        raise ValueError(
            f"the pipeline's ranker predicts {pipeline.actions}, the served ranker {mcfg.actions}"
        )
    corpus_size = None if pipeline is None else len(pipeline.corpus)
    store = ranker.side_store  # side features: looked up by ID, the request brings the rest
    side = None
    if store is not None:
        side = SideFields(
            required=store.required_columns,
            optional=tuple(c for c in store.request_columns if c not in store.required_columns),
            time=store.post_created is not None,
        )
    schemas = build_schemas(limits, max_history, mcfg.actions, mcfg.continuous_actions,
                            mcfg.num_surfaces, corpus_size, side)  # fmt: skip
    RankRequest, RankResponse, Health = schemas.RankRequest, schemas.RankResponse, schemas.Health
    action_index = {a: i for i, a in enumerate(mcfg.actions)}
    routes = ("/rank", "/healthz", "/metrics", "/openapi.json", "/docs")
    if pipeline is not None:
        routes = ("/recommend", *routes)
    metrics = _Metrics(routes)
    # a batch waits for more requests only while more /rank requests are in flight than it holds
    batcher: MicroBatcher[RankQuery, RankResult] = MicroBatcher(
        ranker.rank,
        lambda q: q.num_candidates,
        config.batching,
        expecting=lambda n: metrics.in_flight_by_route["/rank"] > n,
    )
    # /recommend: one request per pipeline call (its own worker thread and bounded queue)
    recommender: MicroBatcher[tuple[UserRequest, int], RecommendResult] | None = None
    if pipeline is not None:
        recommender = MicroBatcher(
            lambda items: [pipeline.recommend(u, k) for u, k in items],
            lambda item: 1,
            BatchConfig(max_batch=1, max_wait_s=0.0, max_queue=config.batching.max_queue),
        )
    workers = [batcher] if recommender is None else [batcher, recommender]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for w in workers:
            await w.start()
        try:
            yield
        finally:
            for w in workers:
                await w.stop()  # uvicorn has let in-flight requests finish by now

    app = FastAPI(
        title="hashrec",
        summary="Phoenix-style ranking of raw requests (hashrec serve).",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.batcher, app.state.metrics, app.state.ranker = batcher, metrics, ranker
    app.state.pipeline = pipeline

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors(), ())

    def signals(history: Any) -> dict[str, np.ndarray]:
        """Each signal column's raw values over the history events (NaN: not sent)."""
        if side is None:
            return {}
        out = {}
        for i, col in enumerate(side.columns):
            vals = [getattr(e.signals, f"s{i}") if e.signals is not None else None for e in history]
            out[col] = np.array([np.nan if v is None else v for v in vals], np.float64)
        return out

    def multi_hot(history: Any) -> np.ndarray:
        """The history events' action names -> [S, A] multi-hot in the ranker's action order."""
        acts = np.zeros((len(history), len(mcfg.actions)), np.float32)
        for i, ev in enumerate(history):
            for a in ev.actions:
                acts[i, action_index[a]] = 1.0
        return acts

    async def parse(request: Request, model: Any) -> Any:
        """The JSON body validated by pydantic's own parser (``model_validate_json``: 4x less
        work than FastAPI's json.loads + validation at 1000 candidates), or the 422 to send."""
        _json_only(request)
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as e:
            return _invalid(e.errors(include_url=False, include_input=False), ("body",))

    def to_query(req: Any) -> RankQuery:
        acts = multi_hot(req.history)
        return RankQuery(
            user_id=req.user_id,
            candidate_post_ids=[c.post_id for c in req.candidates],
            candidate_author_ids=[c.author_id for c in req.candidates],
            candidate_surfaces=[c.surface for c in req.candidates],
            history_post_ids=[e.post_id for e in req.history],
            history_author_ids=[e.author_id for e in req.history],
            history_actions=acts,
            history_surfaces=[e.surface for e in req.history],
            history_signals=signals(req.history),
            candidate_times_ms=[req.time_ms if c.time_ms is None else c.time_ms
                                for c in req.candidates] if side and side.time else None,
        )  # fmt: skip

    async def score(query: Any, worker: MicroBatcher = batcher) -> Any:
        try:
            return await worker.submit(query)
        except QueueFull as e:
            raise HTTPException(429, f"server busy: {e}") from None
        except ValueError as e:  # a request the model cannot take: the client's to fix
            raise HTTPException(422, str(e)) from None

    # the routes read the raw body (``parse``); the request schemas are still published in
    # /openapi.json (below)
    request_schema = RankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request_defs = request_schema.pop("$defs", {})

    @app.post(
        "/rank",
        response_model=RankResponse,
        responses=_ERRORS,
        openapi_extra=_request_body("RankRequest"),
        summary="Score candidates for a user: per-action probabilities and the weighted score",
    )
    async def rank(request: Request) -> Response:
        req = await parse(request, RankRequest)
        if isinstance(req, Response):
            return req
        query = to_query(req)
        res = await score(query)
        out = {
            "candidates": [
                {
                    "post_id": pid,
                    "score": s,
                    "probabilities": dict(zip(mcfg.actions, p, strict=True)),
                    "continuous": dict(zip(mcfg.continuous_actions, c, strict=True)),
                }
                for pid, s, p, c in zip(
                    query.candidate_post_ids.tolist(),
                    res.scores.tolist(),
                    res.probs.tolist(),
                    res.continuous.tolist(),
                    strict=True,
                )
            ]
        }
        # pydantic-core's serialiser: 6x faster than json.dumps on 1000 candidates
        return Response(to_json(out), media_type="application/json")

    if pipeline is not None:
        RecommendRequest = schemas.RecommendRequest
        assert RecommendRequest is not None and schemas.RecommendResponse is not None
        rec_schema = RecommendRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        request_defs.update(rec_schema.pop("$defs", {}))
        users = None if known_users is None else np.unique(np.asarray(known_users, np.int64))

        def to_user(req: Any) -> UserRequest:
            acts = multi_hot(req.history)
            posts = np.array([e.post_id for e in req.history], np.int64)
            seen = np.unique(np.concatenate([posts, np.array(req.exclude_post_ids, np.int64)]))
            known = users is None or bool(np.isin(req.user_id, users))
            return UserRequest(
                user_id=req.user_id,
                actions=tuple(mcfg.actions),
                history_post_ids=posts,
                history_author_ids=np.array([e.author_id for e in req.history], np.int64),
                history_actions=acts,
                history_surface=np.array([e.surface for e in req.history], np.int64),
                seen_post_ids=seen,
                surface=req.surface,
                known_user=known,
                history_signals=signals(req.history),
                time_ms=req.time_ms if side and side.time else None,
            )

        @app.post(
            "/recommend",
            response_model=schemas.RecommendResponse,
            responses=_ERRORS,
            openapi_extra=_request_body("RecommendRequest"),
            summary="The top k posts of the corpus for a user: retrieve -> rank -> score",
        )
        async def recommend(request: Request) -> Response:
            req = await parse(request, RecommendRequest)
            if isinstance(req, Response):
                return req
            res = await score((to_user(req), req.k), recommender)
            out = {
                "user_id": res.user_id,
                "items": [
                    {
                        "post_id": it.post_id,
                        "author_id": it.author_id,
                        "score": it.score,
                        "probabilities": it.probs,
                        "retrieval_score": it.retrieval_score,
                    }
                    for it in res.items
                ],
                "cold_start": res.cold_start,
                "notice": res.notice,
            }
            return Response(to_json(out), media_type="application/json")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_defs)
            components["RankRequest"] = request_schema
            if pipeline is not None:
                components["RecommendRequest"] = rec_schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Any:
        return {
            "status": "ok",
            "actions": list(mcfg.actions),
            "continuous_actions": list(mcfg.continuous_actions),
            "max_history": max_history,
            "max_candidates": limits.max_candidates,
            "corpus_size": corpus_size,
            "max_k": None if corpus_size is None else min(limits.max_k, corpus_size),
            "side_features": None if side is None else side.describe(),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_route() -> str:
        return metrics.render(batcher)

    return _wrap(app, limits.max_body_bytes, metrics)


def _wrap(app: FastAPI, limit: int, metrics: _Metrics) -> FastAPI:
    app.add_middleware(_Guard, limit=limit, metrics=metrics)
    return app
