"""Build the Phoenix agreement fixture: tiny artifacts in X's export format + X's own outputs.

Runs X's released JAX code (``phoenix/`` of xai-org/x-algorithm; not part of hashrec and never
imported at run time or in tests) on synthetic artifacts and writes, under ``--out``:

* ``artifacts/ranker/`` and ``artifacts/retrieval/``: ``config.json``, ``model_params.npz`` (flat
  ``module/param`` keys, every parameter X's model creates, random values), ``embedding_tables.npz``
  (``user_embeddings``, ``item_embeddings``, ``author_embeddings``);
* ``artifacts/corpus.npz``: a small corpus in the ``sports_corpus.npz`` format (post_ids,
  author_ids, candidate_representations from X's candidate tower);
* ``requests/*.json``: requests (``example_sequence.json`` format plus candidates, surfaces,
  timestamps, dwell);
* ``expected.npz``: per request and dtype (float32, bfloat16), X's ranker probabilities
  ``rank_<name>_<dtype>`` [C, 19], the retrieval user vector ``user_<name>_<dtype>`` [D] and the
  candidate tower vectors ``cand_<name>_<dtype>`` [C, D]; and ``run_pipeline.py``'s printed
  ranked list for ``requests/full.json`` over the corpus (top 10 retrieved, all 10 shown):
  ``pipeline_ids_<dtype>`` and ``pipeline_scores_<dtype>`` (4 decimals, as printed).

Batches are built exactly as X's ``run_pipeline.py`` builds them (its own hash functions, unified
table, model config, history truncation/padding and candidate chunking), with the optional inputs
(product surfaces, dwell, impression/creation timestamps) filled where a request has them.

Needs jax and dm-haiku in a separate environment:

    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax dm-haiku numpy
    /tmp/jaxenv/bin/python scripts/make_phoenix_fixture.py PATH/TO/x-algorithm/phoenix \
        --out tests/fixtures/phoenix
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

CONFIG = {
    "emb_size": 16,
    "num_actions": 19,
    "history_seq_len": 6,
    "candidate_seq_len": 4,
    "num_user_hashes": 2,
    "num_item_hashes": 2,
    "num_author_hashes": 2,
    "product_surface_vocab_size": 16,
    "key_size": 8,
    "num_heads": 2,
    "num_layers": 2,
    "post_age_granularity_mins": 60,
    "user_vocab_size": 97,
    "item_vocab_size": 101,
    "author_vocab_size": 89,
    # X's published constants (hashrec.hashing.config.PHOENIX_ENTITIES)
    "hash_params": {
        "user_hash_scales": [196742702, 1852108266],
        "user_biases": [1935840681, 167407236],
        "user_modulus": 2859568897,
        "item_hash_scales": [2161410491, 1754358832],
        "item_biases": [1935840681, 167407236],
        "item_modulus": 2361375383,
        "author_hash_scales": [371965780, 328930218],
        "author_biases": [139686260, 37755056],
        "author_modulus": 631860353,
    },
}


def _random_params(params: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every parameter X's model created, flattened to ``module/param``, with random values."""
    flat = {}
    for module, d in params.items():
        for name, v in d.items():
            shape = tuple(v.shape)
            if name == "scale":  # RMSNorm
                a = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name == "log_temperature":
                a = np.asarray(0.1)
            elif len(shape) == 2:
                a = rng.standard_normal(shape) / np.sqrt(shape[0])
                if "table" in name:
                    a = 0.5 * rng.standard_normal(shape)
                if name == "unembeddings":
                    a = a * 2.0
            else:
                a = rng.standard_normal(shape)
            flat[f"{module}/{name}"] = np.asarray(a, dtype=np.float32)
    return flat


def _requests(rng: np.random.Generator) -> dict[str, dict]:
    def pid() -> int:
        return int(rng.integers(1 << 59, 1 << 61))

    def aid() -> int:
        return int(rng.integers(1, 1 << 40))

    full = {  # longer than history_seq_len (truncated); exactly one chunk of candidates
        "user_id": 123456789,
        "history": [
            {"post_id": pid(), "author_id": aid(), "actions": {str(a): 1 for a in acts}}
            for acts in ([0], [1, 6], [], [3], [11], [2, 5, 7], [4], [9])
        ],
        "candidates": [{"post_id": pid(), "author_id": aid()} for _ in range(4)],
    }
    base = 1_700_000_000
    short = {  # padded history, two chunks (second padded), every optional input
        "user_id": 987654321987,
        "impression_ts": base,
        "history": [
            {
                "post_id": pid(),
                "author_id": aid(),
                "actions": {"1": 1, "11": 1},
                "product_surface": 3,
                "dwell_time": 12.5,
            },
            {"post_id": pid(), "author_id": aid(), "actions": {}, "product_surface": 0},
            {
                "post_id": pid(),
                "author_id": aid(),
                "actions": {"5": 1},
                "product_surface": 7,
                "dwell_time": 95.0,
            },
        ],
        "candidates": [
            {"post_id": pid(), "author_id": aid(), "product_surface": 2, "creation_ts": ts}
            for ts in (base - 600, base - 3 * 3600 - 5, base - 400_000, base + 90, 0, base - 59)
        ],
    }
    empty = {  # no history at all: every history slot is padding
        "user_id": 42,
        "history": [],
        "candidates": [
            {"post_id": pid(), "author_id": aid(), "product_surface": 15} for _ in range(3)
        ],
    }
    return {"full": full, "short": short, "empty": empty}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phoenix_src", help="X's phoenix/ source folder (recsys_model.py, ...)")
    ap.add_argument("--out", default="tests/fixtures/phoenix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(args.phoenix_src).resolve()))
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import run_pipeline as rp  # X's own batch-building helpers
    from recsys_model import PhoenixModelConfig, RecsysBatch, RecsysEmbeddings
    from recsys_retrieval_model import PhoenixRetrievalModelConfig
    from runners import (
        create_dummy_batch_from_config,
        create_dummy_embeddings_from_config,
        load_embedding_table,
        load_model_params,
    )

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    art = out / "artifacts"
    rng = np.random.default_rng(args.seed)
    cfg = CONFIG
    D, S, C, A = (
        cfg[k] for k in ("emb_size", "history_seq_len", "candidate_seq_len", "num_actions")
    )

    def ranker_fn(mc):
        return hk.without_apply_rng(hk.transform(lambda b, e: mc.make()(b, e)))

    def retrieval_init_fn(mc):
        def fwd(b, e):
            m = mc.make()
            u = m.build_user_representation(b, e)
            m.build_candidate_representation(b, e)
            hk.get_parameter("log_temperature", [], init=hk.initializers.Constant(0.0))
            return u

        return hk.transform(fwd)

    # 1. artifacts: X's own parameter structure, random values, written in X's export format
    for kind, cls, make in (
        ("ranker", PhoenixModelConfig, ranker_fn),
        ("retrieval", PhoenixRetrievalModelConfig, retrieval_init_fn),
    ):
        mc = rp.build_model_config(cfg, cls)
        b = create_dummy_batch_from_config(mc.hash_config, S, C, A)
        e = create_dummy_embeddings_from_config(mc.hash_config, D, S, C)
        params = make(mc).init(jax.random.PRNGKey(0), b, e)
        d = art / kind
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        np.savez(d / "model_params.npz", **_random_params(params, rng))
        tables = {
            f"{ent}_embeddings": (0.5 * rng.standard_normal((cfg[f"{ent}_vocab_size"], D))).astype(
                np.float32
            )
            for ent in ("user", "item", "author")
        }
        np.savez(d / "embedding_tables.npz", **tables)

    # 2. X's code on the requests, reading the artifacts back with X's own loaders
    requests = _requests(rng)
    (out / "requests").mkdir(parents=True)
    for name, req in requests.items():
        (out / "requests" / f"{name}.json").write_text(json.dumps(req, indent=1) + "\n")

    rank_params = load_model_params(str(art / "ranker" / "model_params.npz"))
    rank_emb = rp.build_unified_emb_table(
        load_embedding_table(str(art / "ranker" / "embedding_tables.npz")), cfg
    )
    ret_params = load_model_params(str(art / "retrieval" / "model_params.npz"))
    ret_emb = rp.build_unified_emb_table(
        load_embedding_table(str(art / "retrieval" / "embedding_tables.npz")), cfg
    )
    hash_user, hash_item, hash_author = rp.build_hash_functions(cfg)

    def history_inputs(req):
        """As run_pipeline.py: the first S history items, padded at the end."""
        post = np.zeros(S, dtype=np.uint64)
        author = np.zeros(S, dtype=np.uint64)
        actions = np.zeros((S, A), dtype=np.float32)
        surface = np.zeros(S, dtype=np.int32)
        cont = np.zeros((S, 8), dtype=np.float32)
        for i, item in enumerate(req["history"][:S]):
            post[i], author[i] = item["post_id"], item["author_id"]
            for k, v in item.get("actions", {}).items():
                if int(k) < A:
                    actions[i, int(k)] = float(v)
            surface[i] = item.get("product_surface", 0)
            cont[i, 1] = item.get("dwell_time", 0.0)
        uh = hash_user(np.array([req["user_id"]], dtype=np.uint64))
        ph = hash_item(post).reshape(1, S, -1)
        ah = hash_author(author).reshape(1, S, -1)
        return uh, ph, ah, actions[None], surface[None], cont[None]

    expected: dict[str, np.ndarray] = {}
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        rank_mc = rp.build_model_config(cfg, PhoenixModelConfig)
        rank_mc.fprop_dtype = dtype
        rank_fn = ranker_fn(rank_mc)
        ret_mc = rp.build_model_config(cfg, PhoenixRetrievalModelConfig)
        ret_mc.fprop_dtype = dtype

        def user_fwd(b, e, mc=ret_mc):
            return mc.make().build_user_representation(b, e)[0]

        def cand_fwd(b, e, mc=ret_mc):
            return mc.make().build_candidate_representation(b, e)[0]

        user_fn = hk.without_apply_rng(hk.transform(user_fwd))
        cand_fn = hk.without_apply_rng(hk.transform(cand_fwd))

        for name, req in requests.items():
            uh, ph, ah, actions, surface, cont = history_inputs(req)
            has_dwell = any("dwell_time" in it for it in req["history"])
            cands = req["candidates"]
            probs = []
            for i in range(0, len(cands), C):  # run_pipeline.py's chunking
                chunk = cands[i : i + C]
                cs = len(chunk)
                cp = np.zeros(C, dtype=np.uint64)
                ca = np.zeros(C, dtype=np.uint64)
                csurf = np.zeros((1, C), dtype=np.int32)
                impr = np.zeros((1, C), dtype=np.int32)
                created = np.zeros((1, C), dtype=np.int32)
                for j, c in enumerate(chunk):
                    cp[j], ca[j] = c["post_id"], c["author_id"]
                    csurf[0, j] = c.get("product_surface", 0)
                    impr[0, j] = c.get("impression_ts", req.get("impression_ts", 0))
                    created[0, j] = c.get("creation_ts", 0)
                has_ts = bool(impr.any() or created.any())
                cph = hash_item(cp).reshape(1, C, -1)
                cph[0, cs:] = 0
                cah = hash_author(ca).reshape(1, C, -1)
                cah[0, cs:] = 0
                batch = RecsysBatch(
                    user_hashes=jnp.asarray(uh),
                    history_post_hashes=jnp.asarray(ph),
                    history_author_hashes=jnp.asarray(ah),
                    history_actions=jnp.asarray(actions),
                    history_product_surface=jnp.asarray(surface),
                    candidate_post_hashes=jnp.asarray(cph),
                    candidate_author_hashes=jnp.asarray(cah),
                    candidate_product_surface=jnp.asarray(csurf),
                    history_continuous_actions=jnp.asarray(cont) if has_dwell else None,
                    candidate_impr_ts=jnp.asarray(impr) if has_ts else None,
                    candidate_post_creation_ts=jnp.asarray(created) if has_ts else None,
                )
                emb = RecsysEmbeddings(
                    user_embeddings=jnp.asarray(rank_emb[uh]),
                    history_post_embeddings=jnp.asarray(rank_emb[ph]),
                    candidate_post_embeddings=jnp.asarray(rank_emb[cph]),
                    history_author_embeddings=jnp.asarray(rank_emb[ah]),
                    candidate_author_embeddings=jnp.asarray(rank_emb[cah]),
                )
                out_ = rank_fn.apply(rank_params, batch, emb)
                p = jax.nn.sigmoid(out_.logits.astype(jnp.float32))
                probs.append(np.asarray(p[0, :cs], dtype=np.float32))
                # retrieval: user tower on the same history, candidate tower on this chunk
                remb = RecsysEmbeddings(
                    user_embeddings=jnp.asarray(ret_emb[uh]),
                    history_post_embeddings=jnp.asarray(ret_emb[ph]),
                    candidate_post_embeddings=jnp.asarray(ret_emb[cph]),
                    history_author_embeddings=jnp.asarray(ret_emb[ah]),
                    candidate_author_embeddings=jnp.asarray(ret_emb[cah]),
                )
                cr = cand_fn.apply(ret_params, batch, remb)
                expected.setdefault(f"cand_{name}_{dtype_name}", [])
                expected[f"cand_{name}_{dtype_name}"].append(
                    np.asarray(cr[0, :cs].astype(jnp.float32))
                )
                if i == 0:
                    ur = user_fn.apply(ret_params, batch, remb)
                    expected[f"user_{name}_{dtype_name}"] = np.asarray(
                        ur[0].astype(jnp.float32), dtype=np.float32
                    )
            expected[f"rank_{name}_{dtype_name}"] = np.concatenate(probs)
            expected[f"cand_{name}_{dtype_name}"] = np.concatenate(
                expected[f"cand_{name}_{dtype_name}"]
            )

    # 3. a small corpus in sports_corpus.npz's format, encoded by X's candidate tower (float32)
    n = 24
    post_ids = rng.integers(1 << 59, 1 << 61, size=n).astype(np.int64)
    author_ids = rng.integers(1, 1 << 40, size=n).astype(np.int64)
    ph = hash_item(post_ids.astype(np.uint64)).reshape(1, n, -1)
    ah = hash_author(author_ids.astype(np.uint64)).reshape(1, n, -1)
    cfn = hk.without_apply_rng(
        hk.transform(
            lambda b, e: (
                rp.build_model_config(cfg, PhoenixRetrievalModelConfig)
                .make()
                .build_candidate_representation(b, e)[0]
            )
        )
    )
    zb = create_dummy_batch_from_config(rp.HashConfig(), S, n, A)._replace(
        candidate_post_hashes=jnp.asarray(ph), candidate_author_hashes=jnp.asarray(ah)
    )
    ze = dataclasses.replace(
        create_dummy_embeddings_from_config(rp.HashConfig(), D, S, n),
        candidate_post_embeddings=jnp.asarray(ret_emb[ph]),
        candidate_author_embeddings=jnp.asarray(ret_emb[ah]),
    )
    reprs = np.asarray(cfn.apply(ret_params, zb, ze)[0].astype(jnp.float32))
    np.savez(
        art / "corpus.npz",
        post_ids=post_ids,
        author_ids=author_ids,
        candidate_representations=reprs,
    )

    # 4. X's run_pipeline.py end to end (retrieve from the corpus, rank, weighted score), its
    # printed ranked list parsed back: float32 (config patched) and its own bfloat16
    build = rp.build_model_config
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):

        def patched(config, config_class, dtype=dtype):
            mc = build(config, config_class)
            mc.fprop_dtype = dtype
            return mc

        rp.build_model_config = patched
        argv = sys.argv
        sys.argv = ["run_pipeline.py", "--artifacts_dir", str(art), "--sequence_file",
                    str(out / "requests" / "full.json"), "--corpus_file", str(art / "corpus.npz"),
                    "--top_k_retrieval", "10", "--top_k_display", "10"]  # fmt: skip
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                rp.main()
        finally:
            sys.argv = argv
            rp.build_model_config = build
        ids, scores = [], []
        for line in buf.getvalue().splitlines():
            if "/status/" in line:
                ids.append(int(line.rsplit("/", 1)[1]))
                scores.append(float(line.split()[1]))
        expected[f"pipeline_ids_{dtype_name}"] = np.array(ids, dtype=np.int64)
        expected[f"pipeline_scores_{dtype_name}"] = np.array(scores, dtype=np.float64)

    np.savez(out / "expected.npz", **{k: np.asarray(v) for k, v in expected.items()})
    (out / "README.md").write_text(
        "# Phoenix agreement fixture\n\n"
        "Synthetic artifacts in X's export format (random weights, tiny tables, the real layer\n"
        "structure) and X's own outputs on `requests/*.json`, float32 and bfloat16. Made by\n\n"
        "```\n"
        "python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax dm-haiku numpy\n"
        "/tmp/jaxenv/bin/python scripts/make_phoenix_fixture.py PATH/TO/x-algorithm/phoenix \\\n"
        f"    --out tests/fixtures/phoenix --seed {args.seed}\n"
        "```\n\n"
        f"Made with jax {jax.__version__}, dm-haiku {hk.__version__}, from X's phoenix/ source\n"
        "(xai-org/x-algorithm). `tests/test_phoenix.py` compares hashrec against it.\n"
    )
    print(f"wrote {out}: {sorted(expected)}")


if __name__ == "__main__":
    main()
