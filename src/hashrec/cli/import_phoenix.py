"""``hashrec import-phoenix``: X's exported Phoenix artifacts -> hashrec checkpoints."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-phoenix",
        help="convert X's released Phoenix artifacts into hashrec checkpoints",
        description="Read X's exported Phoenix (the unzipped oss-phoenix-artifacts.zip: ranker/ "
        "and retrieval/, each with config.json, model_params.npz, embedding_tables.npz) and "
        "write hashrec safetensors checkpoints: OUT/ranker.safetensors (a PhoenixRanker, usable "
        "by rank, evaluate and as the start of train) and OUT/retrieval.safetensors (a "
        "PhoenixRetrieval).",
    )
    p.add_argument("artifacts", metavar="ARTIFACTS", help="folder with ranker/ and retrieval/")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the checkpoints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hashrec.phoenix import load_ranker, load_retrieval
    from hashrec.training.checkpoint import save_checkpoint

    root = Path(args.artifacts)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such artifact folder")
    kinds = [k for k in ("ranker", "retrieval") if (root / k).is_dir()]
    if not kinds:
        raise FileNotFoundError(f"{root}: no ranker/ or retrieval/ folder (X's artifact layout)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in kinds:  # one model in memory at a time
        model, raw = (load_ranker if kind == "ranker" else load_retrieval)(root / kind)
        path = out / f"{kind}.safetensors"
        extra = {"model": f"phoenix-{kind}", "phoenix_config": raw, "source": str(root / kind)}
        save_checkpoint(path, model, extra=extra)
        print(f"wrote {path}")
        del model
        gc.collect()
    return 0
