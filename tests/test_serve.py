"""hashrec serve: scores over real HTTP equal the library's scoring, every bad-input class gets a
4xx, a schema-driven fuzz run never gets a 5xx, shutdown lets in-flight requests finish, and only
safetensors checkpoints load. Servers bind 127.0.0.1 on a free port."""

import asyncio
import dataclasses
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

import hashrec  # noqa: E402
from hashrec import HashConfig, PhoenixRanker, RankerConfig, RecsysBatch, TransformerConfig  # noqa: E402
from hashrec.models.scoring import ScoringConfig, WeightedScorer  # noqa: E402
from hashrec.serving.app import ServeConfig, create_app  # noqa: E402
from hashrec.serving.batcher import BatchConfig, MicroBatcher, QueueFull  # noqa: E402
from hashrec.serving.pipeline import (  # noqa: E402
    Corpus,
    RecommendPipeline,
    UserRequest,
    default_weights,
)
from hashrec.serving.rank import RankQuery, RequestRanker, to_batch  # noqa: E402
from hashrec.serving.schemas import Limits  # noqa: E402
from hashrec.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

from conftest import cli_error  # noqa: E402

ACTIONS = ("click", "like", "hate")
HISTORY_LEN = 6
LIMITS = Limits(max_candidates=40, max_body_bytes=20_000, max_id=10**12)


def tiny_ranker() -> PhoenixRanker:
    torch.manual_seed(0)
    cfg = RankerConfig(
        hash=HashConfig.uniform(num_buckets=101),
        transformer=TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=ACTIONS,
        continuous_actions=("dwell_time",),
        user_bias_rows=53,  # served requests take the per-user offset too
        user_bias_actions=("click", "hate"),
    )
    model = PhoenixRanker(cfg)
    with torch.no_grad():
        model.user_bias.weight.normal_()  # a fresh offset is 0: give it something to add
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "ranker.safetensors"
    save_checkpoint(path, tiny_ranker(), extra={"examples": {"history_len": HISTORY_LEN}})
    return path


class Server:
    """uvicorn in a thread on 127.0.0.1, on a port the OS picks."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    ranker = RequestRanker(model, history_len=HISTORY_LEN)
    srv = Server(create_app(ranker, ServeConfig(limits=LIMITS)))
    with srv as client:
        yield srv, client, model


def make_request(seed: int, S: int = 3, C: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "user_id": int(rng.integers(1, 10**12)),
        "history": [
            {
                "post_id": int(rng.integers(1, 10**12)),
                "author_id": int(rng.integers(1, 1000)),
                "actions": [a for a in ACTIONS if rng.random() < 0.4],
                "surface": int(rng.integers(0, 16)),
            }
            for _ in range(S)
        ],
        "candidates": [
            {
                "post_id": int(rng.integers(1, 10**12)),
                "author_id": int(rng.integers(1, 1000)),
                "surface": int(rng.integers(0, 16)),
            }
            for _ in range(C)
        ],
    }


def reference_scores(model: PhoenixRanker, req: dict) -> tuple[np.ndarray, np.ndarray]:
    """The request scored by hand: hash with the model's config, left-pad the history to
    HISTORY_LEN as training does, run the model, apply X's weighted scorer."""
    h, S = model.config.hash, HISTORY_LEN
    hist, cands = req["history"], req["candidates"]
    pad = S - len(hist)
    hp = [0] * pad + [e["post_id"] for e in hist]
    ha = [0] * pad + [e["author_id"] for e in hist]
    hs = [0] * pad + [e["surface"] for e in hist]
    acts = [[0.0] * len(ACTIONS)] * pad + [
        [float(a in e["actions"]) for a in ACTIONS] for e in hist
    ]
    batch = RecsysBatch(
        user_hashes=torch.from_numpy(h.rows("user", [req["user_id"]])),
        history_post_hashes=torch.from_numpy(h.rows("post", [hp])),
        history_author_hashes=torch.from_numpy(h.rows("author", [ha])),
        history_actions=torch.tensor([acts]),
        history_product_surface=torch.tensor([hs]),
        candidate_post_hashes=torch.from_numpy(h.rows("post", [[c["post_id"] for c in cands]])),
        candidate_author_hashes=torch.from_numpy(
            h.rows("author", [[c["author_id"] for c in cands]])
        ),
        candidate_product_surface=torch.tensor([[c["surface"] for c in cands]]),
    )
    model.eval()
    with torch.no_grad():
        out = model(batch)
    # the default: X's weights mapped onto the model's actions (like -> favorite, ...)
    weights = default_weights((*ACTIONS, "dwell_time"))
    assert set(weights) == {"click", "like", "hate", "dwell_time"}
    scorer = WeightedScorer(ScoringConfig(weights=weights), ACTIONS, ("dwell_time",))
    return out.probs[0].numpy(), scorer.score(out.probs, out.continuous)[0].numpy()


def check_response(model, req: dict, body: dict) -> None:
    probs, scores = reference_scores(model, req)
    got = body["candidates"]
    assert [c["post_id"] for c in got] == [c["post_id"] for c in req["candidates"]]
    got_probs = np.array([[c["probabilities"][a] for a in ACTIONS] for c in got])
    np.testing.assert_allclose(got_probs, probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([c["score"] for c in got], scores, rtol=1e-5, atol=1e-7)
    assert all(set(c["continuous"]) == {"dwell_time"} for c in got)


@pytest.mark.parametrize(("S", "C"), [(3, 5), (0, 1), (HISTORY_LEN, 40)])
def test_rank_scores_equal_the_library_scoring(served, S, C):
    _, client, model = served
    req = make_request(S * 100 + C, S, C)
    r = client.post("/rank", json=req)
    assert r.status_code == 200, r.text
    check_response(model, req, r.json())


def test_defaults_surface_and_actions(served):
    _, client, model = served
    req = {"user_id": 7, "history": [{"post_id": 5, "author_id": 2}],
           "candidates": [{"post_id": 9, "author_id": 3}]}  # fmt: skip
    r = client.post("/rank", json=req)
    assert r.status_code == 200, r.text
    full = {"user_id": 7, "history": [{"post_id": 5, "author_id": 2, "actions": [], "surface": 0}],
            "candidates": [{"post_id": 9, "author_id": 3, "surface": 0}]}  # fmt: skip
    check_response(model, full, r.json())


def test_concurrent_requests_are_batched_and_each_scored_as_alone(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    ranker = RequestRanker(model, history_len=HISTORY_LEN)
    # a long wait so that the 8 requests sent together certainly share model calls
    cfg = ServeConfig(limits=LIMITS, batching=BatchConfig(max_batch=8, max_wait_s=0.5))
    reqs = [make_request(i, S=i % (HISTORY_LEN + 1), C=1 + 3 * i) for i in range(8)]
    with Server(create_app(ranker, cfg)) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda q: client.post("/rank", json=q), reqs))
        metrics = client.get("/metrics").text
    for req, r in zip(reqs, responses, strict=True):
        assert r.status_code == 200, r.text
        check_response(model, req, r.json())
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line[0] != "#")
    assert int(values["hashrec_model_batch_items_total"]) == 8
    assert int(values["hashrec_model_batches_total"]) < 8
    assert int(values['hashrec_requests_total{route="/rank",status="200"}']) == 8


def test_library_batch_equals_one_by_one(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    ranker = RequestRanker(model, history_len=HISTORY_LEN)
    queries = [
        RankQuery(
            user_id=10 + i,
            candidate_post_ids=np.arange(1, 2 + 3 * i),
            candidate_author_ids=np.arange(1, 2 + 3 * i) % 7 + 1,
            history_post_ids=np.arange(100, 100 + i),
            history_author_ids=np.full(i, 3),
            history_actions=np.eye(len(ACTIONS))[np.arange(i) % len(ACTIONS)],
        )
        for i in range(5)
    ]
    together = ranker.rank(queries)
    for q, t in zip(queries, together, strict=True):
        (alone,) = ranker.rank([q])
        np.testing.assert_allclose(t.probs, alone.probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t.scores, alone.scores, rtol=1e-5, atol=1e-7)


def test_to_batch_refuses_what_the_model_cannot_take(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    q = RankQuery(1, [2], [3], history_post_ids=np.arange(1, 9), history_author_ids=np.ones(8, int))
    with pytest.raises(ValueError, match="history has 8 events, at most 6"):
        to_batch([q], model, HISTORY_LEN)
    with pytest.raises(ValueError, match="candidate_surfaces holds 16, expected 0..15"):
        to_batch([RankQuery(1, [2], [3], candidate_surfaces=[16])], model, HISTORY_LEN)
    with pytest.raises(ValueError, match="candidate_post_ids holds 0, expected IDs >= 1"):
        RankQuery(1, [0], [3])
    with pytest.raises(ValueError, match="candidate_author_ids has 2 entries, expected 1"):
        RankQuery(1, [1], [3, 4])


BIG = "1" + "0" * 5000  # beyond Python's int-parsing limit
ONE = '{"post_id": 1, "author_id": 1}'


def body(user="1", history="[]", candidates=f"[{ONE}]", extra="") -> str:
    return f'{{"user_id": {user}, "history": {history}, "candidates": {candidates}{extra}}}'


BAD_BODIES = {
    "malformed json": '{"user_id": 1, "candidates": [',
    "not an object": "[1, 2, 3]",
    "empty body": "",
    "null": "null",
    "string id": body(user='"1"'),
    "float id": body(user="1.0"),
    "bool id": body(user="true"),
    "object id": body(user="{}"),
    "negative id": body(user="-5"),
    "zero id (padding)": body(user="0"),
    "id above max_id": body(user=str(10**12 + 1)),
    "id above int64": body(user=str(2**64)),
    "huge number": body(user="1e400"),
    "5000-digit number": body(user=BIG),
    "NaN": body(user="NaN"),
    "Infinity": body(user="Infinity"),
    "-Infinity in a candidate": body(candidates='[{"post_id": -Infinity, "author_id": 1}]'),
    "unknown top-level field": body(extra=', "debug": true'),
    "unknown candidate field": body(candidates='[{"post_id": 1, "author_id": 1, "score": 1}]'),
    "unknown history field": body(history='[{"post_id": 1, "author_id": 1, "time": 5}]'),
    "missing user_id": f'{{"candidates": [{ONE}]}}',
    "missing candidates": '{"user_id": 1}',
    "no candidates": body(candidates="[]"),
    "too many candidates": body(candidates="[" + ",".join([ONE] * 41) + "]"),
    "history too long": body(history="[" + ",".join([ONE] * (HISTORY_LEN + 1)) + "]"),
    "unknown action": body(history='[{"post_id": 1, "author_id": 1, "actions": ["fly"]}]'),
    "action twice": body(history='[{"post_id": 1, "author_id": 1, "actions": ["click", "click"]}]'),
    "surface out of range": body(candidates='[{"post_id": 1, "author_id": 1, "surface": 16}]'),
    "negative surface": body(candidates='[{"post_id": 1, "author_id": 1, "surface": -1}]'),
    "candidates not a list": body(candidates=ONE),
    "deep nesting": body(user="[" * 5000 + "]" * 5000),
    "invalid utf-8": b'{"user_id": 1, "candidates": [\xff\xfe]}',
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_input_gets_a_4xx(served, name):
    _, client, _ = served
    content = BAD_BODIES[name]
    r = client.post("/rank", content=content, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "detail" in r.json()
    assert client.get("/healthz").status_code == 200  # still alive


def test_body_limits_and_other_http_errors(served):
    srv, client, _ = served
    big = body(candidates="[" + ",".join([ONE] * 1000) + "]")
    assert len(big) > LIMITS.max_body_bytes
    assert client.post("/rank", content=big).status_code == 413  # Content-Length says so

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000].encode()

    r = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert client.post("/rank", content=body(), headers={"content-type": "text/plain"}).status_code in (415, 422)  # fmt: skip
    assert client.get("/rank").status_code == 405
    assert client.post("/nowhere", json={}).status_code == 404
    assert client.post("/recommend", json={"user_id": 1}).status_code == 404  # no retriever
    raw = socket.create_connection(("127.0.0.1", client.base_url.port))
    raw.sendall(b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    assert raw.recv(100).split(b" ")[1].startswith(b"4")  # a malformed request line: 400
    raw.close()
    assert client.get("/healthz").json()["status"] == "ok"


def test_healthz_metrics_and_openapi(served):
    _, client, _ = served
    health = client.get("/healthz").json()
    assert health["actions"] == list(ACTIONS) and health["max_history"] == HISTORY_LEN
    schema = client.get("/openapi.json").json()
    assert {"/rank", "/healthz", "/metrics"} <= set(schema["paths"])
    comp = schema["components"]["schemas"]
    assert comp["RankRequest"]["properties"]["candidates"]["maxItems"] == LIMITS.max_candidates
    assert comp["RankRequest"]["additionalProperties"] is False
    metrics = client.get("/metrics").text
    assert 'hashrec_request_seconds_count{route="/healthz"}' in metrics
    assert "hashrec_requests_in_flight 1" in metrics  # this request


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_never_5xx(rec_served, mode):
    """Requests generated from /openapi.json by schemathesis (valid ones, and ones that break
    the schema), a bounded number per operation: none gets a 5xx. The app serves a retriever
    too, so /recommend is fuzzed with /rank."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    srv, _, _ = rec_served
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/rank", "/recommend", "/healthz", "/metrics"}
    calls = []
    for op in operations:
        if mode == "negative" and op.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form

        @given(case=op.as_strategy(GenerationMode(mode)))
        @settings(max_examples=40 if op.method.upper() == "POST" else 5, deadline=None,
                  database=None, suppress_health_check=list(HealthCheck))  # fmt: skip
        def call(case):
            if mode == "positive":  # IDs must be JSON integers: a float loses digits past 2^53
                case.body = _integral_floats_to_int(case.body)
            r = case.call(base_url=srv.url, timeout=30)
            calls.append((case.path, r.status_code))
            assert r.status_code < 500, (case.method, case.path, case.body, r.text[:300])

        call()
    assert len(calls) >= 80 and {p for p, _ in calls} >= {"/rank", "/recommend"}
    if mode == "positive":  # every valid request is served
        assert {status for _, status in calls} == {200}, calls
    else:
        posts = [status for path, status in calls if path in ("/rank", "/recommend")]
        assert all(400 <= status < 500 for status in posts), calls


def _integral_floats_to_int(x):
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _integral_floats_to_int(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_integral_floats_to_int(v) for v in x]
    return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hashrec_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hashrec", *args]


def env() -> dict:
    src = str(Path(hashrec.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))  # fmt: skip
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ")[1]), rest


def test_graceful_shutdown_finishes_in_flight_requests(checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        hashrec_command(*f"serve --ranker {checkpoint} --port {port}".split()),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        # A request in flight: headers and half the body sent when the signal arrives.
        body = json.dumps(make_request(1, S=2, C=7)).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:50])  # fmt: skip
        while "hashrec_requests_in_flight 2" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the request never reached the app"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still serving the request in flight
        with pytest.raises(httpx.TransportError):  # but no longer accepting new ones
            httpx.get(f"{url}/healthz", timeout=2)
        sock.sendall(body[50:])
        status, answer = _read_response(sock)
        sock.close()
        assert status == 200, answer
        assert len(json.loads(answer)["candidates"]) == 7
        # uvicorn re-raises the signal once it has shut down cleanly (exit by SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "Traceback" not in log and "Finished server process" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_only_safetensors_checkpoints_load(tmp_path, capsys, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    err = cli_error(["serve", "--ranker", str(path), "--port", "0"], capsys, 1)
    assert err.startswith("hashrec serve: error:") and "not a readable checkpoint" in err
    assert not marker.exists()


def test_serve_cli_errors(checkpoint, tmp_path, capsys):
    err = cli_error(["serve", "--ranker", str(checkpoint), "--max-candidates", "0"], capsys, 2)
    assert "max_candidates must be >= 1" in err
    err = cli_error(["serve", "--ranker", str(tmp_path / "none.safetensors")], capsys, 1)
    assert "no such checkpoint" in err
    err = cli_error(["serve", "--ranker", str(checkpoint), "--weights", "{bad"], capsys, 2)
    assert "--weights is not JSON" in err
    err = cli_error(["serve", "--ranker", str(checkpoint), "--weights", '{"share": 1}'], capsys, 2)
    assert "--weights names ['share']" in err
    err = cli_error(["serve", "--ranker", str(checkpoint), "--retriever", str(checkpoint)],
                    capsys, 1)  # fmt: skip
    assert "--retriever" in err and "holds a PhoenixRanker, expected a TwoTowerRetriever" in err
    err = cli_error(["serve", "--ranker", str(checkpoint), "--data", str(tmp_path)], capsys, 2)
    assert "--data gives /recommend's corpus (it needs --retriever)" in err
    err = cli_error(["serve", "--ranker", str(checkpoint), "--device", "tpu"], capsys, 1)
    if not torch.cuda.is_available():
        err = cli_error(["serve", "--ranker", str(checkpoint), "--device", "cuda"], capsys, 1)
        assert "CUDA is not available" in err


def test_batcher_bounds_batches_and_isolates_failures():
    seen: list[list[int]] = []

    def fn(xs):
        seen.append(list(xs))
        if 13 in xs:
            raise ValueError("13 is bad")
        return [x + 1 for x in xs]

    async def main():
        b = MicroBatcher(fn, lambda x: x, BatchConfig(max_batch=4, max_wait_s=0.2,
                                                       max_batch_slots=40))  # fmt: skip
        await b.start()
        tasks = [asyncio.ensure_future(b.submit(x)) for x in (1, 2, 13, 3, 20, 30)]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert out[:2] == [2, 3] and isinstance(out[2], ValueError) and out[3:] == [4, 21, 31]
    for batch in seen:
        assert (len(batch) <= 4 and max(batch) * len(batch) <= 40) or len(batch) == 1
    assert sorted(x for batch in seen if len(batch) == 1 for x in batch if x == 13) == [13]


def test_batcher_stop_finishes_queued_items():
    async def main():
        b = MicroBatcher(lambda xs: [x * 10 for x in xs], lambda x: 1, BatchConfig(max_batch=2))
        await b.start()
        tasks = [asyncio.ensure_future(b.submit(x)) for x in range(7)]
        await asyncio.sleep(0)  # all queued
        await b.stop()
        return [t.result() for t in tasks], b.batches

    results, batches = asyncio.run(main())
    assert results == [x * 10 for x in range(7)] and batches == 4


def test_json_example_in_readme_is_valid(served):
    _, client, _ = served
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- serve-example -->")
    block = readme[start:].split("```json\n", 1)[1].split("```", 1)[0]
    r = client.post("/rank", json=json.loads(block))
    assert r.status_code == 200, r.text


def test_batcher_waits_only_while_more_items_are_expected():
    async def main(expecting):
        b = MicroBatcher(lambda xs: list(xs), lambda x: 1, BatchConfig(max_wait_s=1.0),
                         expecting=expecting)  # fmt: skip
        await b.start()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.2)  # well inside the 1 s wait
        second = await b.submit(2)
        await first
        await b.stop()
        return b.batches, second

    assert asyncio.run(main(lambda n: True)) == (1, 2)  # waited: one batch
    assert asyncio.run(main(lambda n: False)) == (2, 2)  # nobody expected: ran at once


def test_batcher_refuses_beyond_max_queue():
    async def main():
        b = MicroBatcher(lambda xs: list(xs), lambda x: 1, BatchConfig(max_queue=2))
        await b.start()
        tasks = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert out[:2] == [0, 1] and all(isinstance(e, QueueFull) for e in out[2:])


# -- POST /recommend: retrieve -> rank -> score over a corpus -----------------------------------

REC_LIMITS = Limits(max_candidates=40, max_body_bytes=20_000, max_id=10**12, max_k=12,
                    max_exclude=40)  # fmt: skip
CORPUS = Corpus(
    post_ids=np.arange(1, 31) * 7,  # 7, 14, ..., 210
    author_ids=np.arange(30) % 6 + 1,
    popularity=np.random.default_rng(0).integers(0, 50, 30).astype(np.float64),
)
KNOWN_USERS = np.array([5, 6, 9])


def tiny_retriever():
    from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever

    torch.manual_seed(1)
    cfg = TwoTowerConfig(
        hash=HashConfig.uniform(num_buckets=101),
        transformer=TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=ACTIONS,
    )
    return TwoTowerRetriever(cfg)


@pytest.fixture(scope="module")
def rec_served(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    pipeline = RecommendPipeline(tiny_retriever(), model, CORPUS, retrieve_k=16)
    app = create_app(RequestRanker(model, history_len=HISTORY_LEN),
                     ServeConfig(limits=REC_LIMITS), pipeline, KNOWN_USERS)  # fmt: skip
    srv = Server(app)
    with srv as client:
        yield srv, client, pipeline


def user_request(req: dict) -> UserRequest:
    """The JSON request as the library's ``UserRequest``, built by hand."""
    hist = req.get("history", [])
    posts = np.array([e["post_id"] for e in hist], np.int64)
    return UserRequest(
        user_id=req["user_id"],
        actions=ACTIONS,
        history_post_ids=posts,
        history_author_ids=np.array([e["author_id"] for e in hist], np.int64),
        history_actions=np.array(
            [[float(a in e.get("actions", [])) for a in ACTIONS] for e in hist], np.float32
        ).reshape(len(hist), len(ACTIONS)),
        history_surface=np.array([e.get("surface", 0) for e in hist], np.int64),
        seen_post_ids=np.union1d(posts, req.get("exclude_post_ids", [])).astype(np.int64),
        surface=req.get("surface"),
        known_user=req["user_id"] in KNOWN_USERS,
    )


def check_recommend(pipeline, req: dict, body: dict) -> None:
    want = pipeline.recommend(user_request(req), req.get("k", 12))
    assert body["user_id"] == want.user_id
    assert body["cold_start"] == want.cold_start and body["notice"] == want.notice
    got = body["items"]
    assert [(i["post_id"], i["author_id"]) for i in got] == [
        (w.post_id, w.author_id) for w in want.items
    ]
    np.testing.assert_allclose([i["score"] for i in got], [w.score for w in want.items],
                               rtol=1e-6)  # fmt: skip
    for g, w in zip(got, want.items, strict=True):
        assert g["probabilities"].keys() == w.probs.keys()
        np.testing.assert_allclose(list(g["probabilities"].values()), list(w.probs.values()),
                                   rtol=1e-6)  # fmt: skip
        if w.retrieval_score is None:
            assert g["retrieval_score"] is None
        else:
            assert g["retrieval_score"] == pytest.approx(w.retrieval_score, rel=1e-6)


REC_REQUESTS = {
    "known user with history": {
        "user_id": 5,
        "history": [
            {"post_id": 14, "author_id": 2, "actions": ["click", "like"], "surface": 3},
            {"post_id": 70, "author_id": 4, "actions": []},
            {"post_id": 999, "author_id": 8, "actions": ["hate"], "surface": 1},
        ],
        "k": 8,
    },
    "unknown user with history": {
        "user_id": 123456789,
        "history": [{"post_id": 21, "author_id": 3, "actions": ["click"]}],
        "exclude_post_ids": [7, 28, 500],
        "surface": 2,
    },
    "known user without history": {"user_id": 9, "k": 3},
    "all defaults": {"user_id": 6},
}


@pytest.mark.parametrize("name", list(REC_REQUESTS))
def test_recommend_equals_the_pipeline(rec_served, name):
    _, client, pipeline = rec_served
    req = REC_REQUESTS[name]
    r = client.post("/recommend", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == req.get("k", 12) and not body["cold_start"]
    assert all(i["retrieval_score"] is not None for i in body["items"])
    check_recommend(pipeline, req, body)
    hist = {e["post_id"] for e in req.get("history", [])}
    assert not hist & {i["post_id"] for i in body["items"]}  # the history's posts are seen


def test_recommend_honours_exclusions(rec_served):
    _, client, pipeline = rec_served
    req = {"user_id": 5, "history": [{"post_id": 14, "author_id": 2}], "k": 5}
    first = [i["post_id"] for i in client.post("/recommend", json=req).json()["items"]]
    assert len(first) == 5
    req = {**req, "exclude_post_ids": first[:3]}
    body = client.post("/recommend", json=req).json()
    again = [i["post_id"] for i in body["items"]]
    assert len(again) == 5 and not set(first[:3]) & set(again)
    check_recommend(pipeline, req, body)
    # everything excluded but 2 posts: k = 5 gets those 2; nothing left: an empty list
    rest = [int(p) for p in CORPUS.post_ids if p not in (7, 210)]
    body = client.post("/recommend", json={"user_id": 6, "exclude_post_ids": rest}).json()
    assert sorted(i["post_id"] for i in body["items"]) == [7, 210]
    req = {"user_id": 6, "exclude_post_ids": [int(p) for p in CORPUS.post_ids]}
    r = client.post("/recommend", json=req)
    assert r.status_code == 200 and r.json()["items"] == [], r.text


def test_recommend_cold_start(rec_served):
    _, client, pipeline = rec_served
    req = {"user_id": 424242, "k": 4, "exclude_post_ids": [int(CORPUS.post_ids[0])]}
    r = client.post("/recommend", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and "cold start" in body["notice"]
    assert all(i["retrieval_score"] is None for i in body["items"])
    # ranked from the most popular unseen posts
    unseen = [(-pop, pid) for pid, pop in zip(CORPUS.post_ids, CORPUS.popularity, strict=True)
              if pid != CORPUS.post_ids[0]]  # fmt: skip
    popular = {int(pid) for _, pid in sorted(unseen)[:16]}
    assert {i["post_id"] for i in body["items"]} <= popular
    check_recommend(pipeline, req, body)


def rec_body(extra: str = "", user: str = "5") -> str:
    return f'{{"user_id": {user}{extra}}}'


BAD_RECOMMEND = {
    "k zero": rec_body(', "k": 0'),
    "k negative": rec_body(', "k": -3'),
    "k above max_k": rec_body(', "k": 13'),
    "k float": rec_body(', "k": 5.0'),
    "k string": rec_body(', "k": "5"'),
    "k bool": rec_body(', "k": true'),
    "k NaN": rec_body(', "k": NaN'),
    "k huge": rec_body(', "k": 1e400'),
    "k above int64": rec_body(f', "k": {2**64}'),
    "k 5000 digits": rec_body(f', "k": {BIG}'),
    "user NaN": rec_body(user="NaN"),
    "user zero": rec_body(user="0"),
    "user above max_id": rec_body(user=str(10**12 + 1)),
    "missing user": '{"k": 3}',
    "unknown field": rec_body(', "candidates": []'),
    "unknown history field": rec_body(', "history": [{"post_id": 1, "author_id": 1, "t": 1}]'),
    "history too long": rec_body(', "history": [' + ",".join([ONE] * (HISTORY_LEN + 1)) + "]"),
    "unknown action": rec_body(', "history": [{"post_id": 1, "author_id": 1, "actions": ["x"]}]'),
    "too many exclusions": rec_body(', "exclude_post_ids": [' + ",".join(["7"] * 41) + "]"),
    "exclusion zero": rec_body(', "exclude_post_ids": [0]'),
    "exclusion float": rec_body(', "exclude_post_ids": [7.5]'),
    "surface out of range": rec_body(', "surface": 16'),
    "surface negative": rec_body(', "surface": -1'),
    "malformed json": '{"user_id": 5, "k": ',
    "not an object": "[5]",
    "empty body": "",
}


@pytest.mark.parametrize("name", list(BAD_RECOMMEND))
def test_recommend_bad_input_gets_a_4xx(rec_served, name):
    _, client, _ = rec_served
    r = client.post("/recommend", content=BAD_RECOMMEND[name],
                    headers={"content-type": "application/json"})  # fmt: skip
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "detail" in r.json()
    assert client.get("/healthz").status_code == 200


def test_recommend_limits_in_openapi_healthz_and_http_errors(rec_served):
    _, client, _ = rec_served
    comp = client.get("/openapi.json").json()["components"]["schemas"]
    req = comp["RecommendRequest"]
    assert req["additionalProperties"] is False and req["properties"]["k"]["maximum"] == 12
    assert req["properties"]["exclude_post_ids"]["maxItems"] == REC_LIMITS.max_exclude
    health = client.get("/healthz").json()
    assert health["corpus_size"] == len(CORPUS) and health["max_k"] == 12
    r = client.post("/recommend", content=rec_body(), headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert client.get("/recommend").status_code == 405
    big = rec_body(', "exclude_post_ids": [' + ",".join(["7"] * 12_000) + "]")
    assert len(big) > REC_LIMITS.max_body_bytes
    assert client.post("/recommend", content=big).status_code == 413
    metrics = client.get("/metrics").text
    assert 'hashrec_requests_total{route="/recommend",status="413"}' in metrics


def test_recommend_json_example_in_readme_is_valid(rec_served):
    _, client, pipeline = rec_served
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- recommend-example -->")
    req = json.loads(readme[start:].split("```json\n", 1)[1].split("```", 1)[0])
    r = client.post("/recommend", json=req)
    assert r.status_code == 200, r.text
    check_recommend(pipeline, req, r.json())


def test_recommend_is_absent_without_a_retriever(served):
    _, client, _ = served
    assert client.post("/recommend", json={"user_id": 1}).status_code == 404
    assert "/recommend" not in client.get("/openapi.json").json()["paths"]
    assert client.get("/healthz").json()["max_k"] is None


def test_serve_cli_builds_the_corpus_from_data(checkpoint, tmp_path):
    """``hashrec serve --retriever --data``: the corpus is every post of the log, its users are
    known, k is bounded by the corpus; answers equal a pipeline built from the same log."""
    from hashrec.cli import serve
    from hashrec.cli.dispatch import build_parser
    from hashrec.data import LogSchema, load_log

    from conftest import SCHEMA_JSON, write_synthetic_log

    log_file = tmp_path / "log.csv"
    write_synthetic_log(log_file)
    retriever = tmp_path / "retriever.safetensors"
    save_checkpoint(retriever, tiny_retriever())
    args = build_parser().parse_args(
        ["serve", "--ranker", str(checkpoint), "--retriever", str(retriever), "--data",
         str(log_file), "--schema", SCHEMA_JSON, "--max-k", "1000", "--retrieve-k", "10"]
    )  # fmt: skip
    app = serve.build(args)
    log = load_log(str(log_file), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    corpus = Corpus.from_log(log)
    model, info = load_checkpoint(checkpoint)
    retr, _ = load_checkpoint(retriever)
    trained = (info.extra.get("examples") or {}).get("history_len", 32)  # as serve pads
    pipeline = RecommendPipeline(retr, model, corpus, retrieve_k=10, history_len=trained)
    user = int(log.user[0])
    with Server(app) as client:
        assert client.get("/healthz").json()["corpus_size"] == len(corpus)
        for req, cold in (({"user_id": user, "k": 4}, False), ({"user_id": 10**9, "k": 4}, True)):
            r = client.post("/recommend", json=req)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["cold_start"] is cold
            want = pipeline.recommend(UserRequest(req["user_id"], tuple(log.actions),
                                                  known_user=not cold), 4)  # fmt: skip
            assert [i["post_id"] for i in body["items"]] == [w.post_id for w in want.items]
        r = client.post("/recommend", json={"user_id": user, "k": len(corpus) + 1})
        assert r.status_code == 422 and "less than or equal to" in r.text, r.text


def test_serve_several_rankers_as_one_ensemble(checkpoint, tmp_path, capsys):
    """``hashrec serve --ranker A B``: /rank answers with the mean of the two rankers' logits
    (and of their continuous outputs in the score); rankers of other configurations or other
    recorded inputs, and a repeated path, are refused by name."""
    from hashrec.cli import serve
    from hashrec.cli.dispatch import build_parser
    from hashrec.models.ensemble import RankerEnsemble

    torch.manual_seed(1)
    other = tmp_path / "seed1.safetensors"
    model_a, info = load_checkpoint(checkpoint)
    model_b = PhoenixRanker(model_a.config)  # another initialisation, the same configuration
    save_checkpoint(other, model_b, extra=info.extra)
    app = serve.build(build_parser().parse_args(["serve", "--ranker", str(checkpoint), str(other)]))
    req = make_request(5, S=3, C=6)
    with Server(app) as client:
        body = client.post("/rank", json=req).json()
    (pa, _), (pb, _) = reference_scores(model_a, req), reference_scores(model_b, req)
    assert np.abs(pa - pb).max() > 1e-3  # two different rankers
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    want = 1 / (1 + np.exp(-(logit(pa.astype(np.float64)) + logit(pb)) / 2))
    got = np.array([[c["probabilities"][a] for a in ACTIONS] for c in body["candidates"]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    check_response(RankerEnsemble([model_a, model_b]), req, body)  # scores, continuous outputs

    wide = tmp_path / "wide.safetensors"
    cfg = model_a.config
    narrow = TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1)
    save_checkpoint(wide, PhoenixRanker(dataclasses.replace(cfg, transformer=narrow)),
                    extra=info.extra)  # fmt: skip
    err = cli_error(["serve", "--ranker", str(checkpoint), str(wide)], capsys, 1)
    assert f"--ranker {wide}: its model configuration differs from {checkpoint}'s" in err
    assert "(differing entries transformer)" in err
    moved = tmp_path / "moved.safetensors"
    save_checkpoint(moved, model_b, extra={"examples": {"history_len": HISTORY_LEN + 1}})
    err = cli_error(["serve", "--ranker", str(checkpoint), str(moved)], capsys, 1)
    assert f"--ranker {moved}: its recorded examples differs from {checkpoint}'s" in err
    assert "(differing entries history_len)" in err
    refit = tmp_path / "refit.safetensors"
    save_checkpoint(refit, model_b, extra={**info.extra, "refit": {"epochs": 1}})
    err = cli_error(["serve", "--ranker", str(checkpoint), str(refit)], capsys, 1)
    assert (
        f"{refit} is a refit model (trained again on every training day), {checkpoint} is " in err
    )
    same = os.path.join(os.path.dirname(checkpoint), ".", os.path.basename(checkpoint))
    err = cli_error(["serve", "--ranker", str(checkpoint), same], capsys, 2)
    assert f"--ranker {same} is given more than once" in err


def test_serve_loads_every_ranker_on_the_given_device(checkpoint, tmp_path, monkeypatch):
    """``--device`` reaches the checkpoint loader for each ranker (``cpu:0``: a device other
    than the loader's default, that every machine has)."""
    import hashrec.training.checkpoint as ckpt
    from hashrec.cli import serve
    from hashrec.cli.dispatch import build_parser

    other = tmp_path / "seed1.safetensors"
    model, info = load_checkpoint(checkpoint)
    save_checkpoint(other, PhoenixRanker(model.config), extra=info.extra)
    seen = []
    real = ckpt.load_checkpoint

    def spy(path, map_location="cpu", **kwargs):
        seen.append(map_location)
        return real(path, map_location=map_location, **kwargs)

    monkeypatch.setattr(ckpt, "load_checkpoint", spy)
    argv = ["serve", "--ranker", str(checkpoint), str(other), "--device", "cpu:0"]
    app = serve.build(build_parser().parse_args(argv))
    assert seen == [torch.device("cpu", 0)] * 2
    with Server(app) as client:
        assert client.post("/rank", json=make_request(5, S=3, C=4)).status_code == 200
