"""Peak memory of loading X's released Phoenix artifacts (synthetic files of the real shapes).

Writes a ranker artifact folder in X's export format with the released shapes (emb 128, 4
layers, 4 heads of 32, 1M rows per table: 3 x 1M x 128 float32 = 1.54 GB of tables, random
values), then, each in a fresh process, measures the peak resident memory (VmHWM) of:

* ``baseline``: python + torch + hashrec imported, nothing loaded (and a numpy-only baseline
  for X's loading, which imports no torch);
* ``hashrec.phoenix.load_ranker``: tables streamed into the fused table;
* ``import-phoenix``: load + write the safetensors checkpoint;
* ``load_checkpoint`` of that checkpoint (what ``rank`` and ``recommend`` do with it);
* ``np.load`` + ``run_pipeline.py``'s ``build_unified_emb_table`` (X's own loading), for
  comparison.

Run under the heavy-job lock:
    flock /tmp/hashrec-heavy.lock python benchmarks/phoenix_load_memory.py --dir /tmp/phx_mem
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D, VOCAB = 128, 1_000_000


def write_artifacts(folder: Path, vocab: int = VOCAB) -> None:
    from hashrec.models.ranker import PhoenixRanker, RankerConfig
    from hashrec.phoenix.artifacts import param_map, read_config

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "emb_size": D, "num_actions": 19, "history_seq_len": 127, "candidate_seq_len": 64,
        "num_user_hashes": 2, "num_item_hashes": 2, "num_author_hashes": 2,
        "product_surface_vocab_size": 16, "key_size": 32, "num_heads": 4, "num_layers": 4,
        "post_age_granularity_mins": 60, "user_vocab_size": vocab, "item_vocab_size": vocab,
        "author_vocab_size": vocab,
        "hash_params": {
            "user_hash_scales": [196742702, 1852108266], "user_biases": [1935840681, 167407236],
            "user_modulus": 2859568897, "item_hash_scales": [2161410491, 1754358832],
            "item_biases": [1935840681, 167407236], "item_modulus": 2361375383,
            "author_hash_scales": [371965780, 328930218], "author_biases": [139686260, 37755056],
            "author_modulus": 631860353,
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    _, rc = read_config(folder)
    # the dense parameters only: the same model with a tiny table
    small = RankerConfig.phoenix_mini(vocab_sizes={"user": 2, "post": 2, "author": 2})
    assert small.transformer == rc.transformer
    model = PhoenixRanker(small)
    params = dict(model.named_parameters())
    out = {}
    for key, (name, transpose) in param_map("ranker", 4).items():
        t = params[name].detach()
        out[key] = (t.T if transpose else t).numpy().astype(np.float32)
    np.savez(folder / "model_params.npz", **out)
    rng = np.random.default_rng(0)
    tables = {
        k: rng.standard_normal((vocab, D), dtype=np.float32)
        for k in ("user_embeddings", "item_embeddings", "author_embeddings")
    }
    np.savez(folder / "embedding_tables.npz", **tables)


# name -> (code, the baseline row it is compared with)
MEASURE = {
    "baseline": "import torch, hashrec.phoenix",
    "baseline (numpy only)": "import numpy, json",
    "hashrec.phoenix.load_ranker": "import hashrec.phoenix as p; m, _ = p.load_ranker(F)",
    "import-phoenix": "from hashrec.cli import main; main(['import-phoenix', str(F.parent), "
    "'--out', str(F.parent / 'ckpt')])",
    "load_checkpoint (import-phoenix's output)": "from hashrec.training.checkpoint import "
    "load_checkpoint; m, _ = load_checkpoint(F.parent / 'ckpt' / 'ranker.safetensors')",
    "X: np.load + build_unified_emb_table": "import numpy as np, json; "
    "cfg = json.loads((F / 'config.json').read_text()); "
    "d = dict(np.load(F / 'embedding_tables.npz')); pad = 65; "
    "uv = iv = av = cfg['user_vocab_size']; "
    "t = np.zeros((pad + uv + iv + av, 128), dtype=np.float32); "
    "t[pad:pad + uv] = d['user_embeddings']; t[pad + uv:pad + uv + iv] = d['item_embeddings']; "
    "t[pad + uv + iv:] = d['author_embeddings']",
}


def measure(code: str, folder: Path) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of a fresh interpreter running ``code`` (F = the ranker
    folder)."""
    # VmHWM: the peak of this process's own memory (ru_maxrss would carry the parent's over exec)
    script = (
        "import sys; from pathlib import Path; F = Path(sys.argv[1]); "
        + code
        + "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1]) / 2**20, time.perf_counter() - t0  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/phoenix_mem", help="where to write the artifacts")
    ap.add_argument("--rows", type=int, default=VOCAB, help="rows per table (released: 1M)")
    args = ap.parse_args()
    folder = Path(args.dir) / "ranker"
    if not (folder / "embedding_tables.npz").exists():
        write_artifacts(folder, args.rows)
    vocab = json.loads((folder / "config.json").read_text())["user_vocab_size"]
    size = 3 * vocab * D * 4 / 2**30
    rows = [(name, *measure(code, folder)) for name, code in MEASURE.items()]
    peaks = {name: peak for name, peak, _ in rows}
    print(f"tables: 3 x {vocab:,} x {D} float32 = {size:.2f} GiB")
    print("| what | peak RSS (GiB) | above its baseline (GiB) | / table size | wall (s) |")
    print("|---|---|---|---|---|")
    for name, peak, wall in rows:
        numpy_only = name.startswith("X:") or "numpy" in name
        base = peaks["baseline (numpy only)" if numpy_only else "baseline"]
        print(
            f"| {name} | {peak:.2f} | {peak - base:.2f} | {(peak - base) / size:.2f}x "
            f"| {wall:.1f} |"
        )


if __name__ == "__main__":
    main()
