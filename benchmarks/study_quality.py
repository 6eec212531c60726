"""Quality study on the 11 KuaiRand-Pure days: hashed tables against the full table and baselines.

    python benchmarks/study_quality.py [--data ../shared/data/kuairand-pure] [--epochs 2]

Train 2022-04-25..05-02, evaluate 05-03..05-05, every model and baseline on the same evaluation
impressions in this run: popularity, logistic regression on target-encoded rates, the ranker with a
collision-free table, hashed k = 2 at a sweep of table sizes (fraction of distinct IDs per entity),
and hashed k = 1 at the same memory as k = 2 at 25%. Writes runs/study/{study.json, study.md,
click_auc_vs_memory.png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hashrec.data import ExampleConfig, load_kuairand
from hashrec.evaluation.experiment import (
    ModelSpec,
    Split,
    baseline_predictions,
    collision_free_spec,
    evaluate_predictions,
    hashed_config,
    run_model,
)
from hashrec.evaluation.report import format_results
from hashrec.files import write_json_atomic, write_text_atomic
from hashrec.training.trainer import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/kuairand-pure")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fractions", default="0.05,0.1,0.25,0.5")
    p.add_argument("--out", default="runs/study")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = load_kuairand(args.data)
    split = Split(train_end=20220502, eval_start=20220503, eval_end=20220505)
    examples = ExampleConfig()
    train_cfg = TrainConfig(epochs=args.epochs)
    specs = [collision_free_spec(log)]
    for f in (float(x) for x in args.fractions.split(",")):
        specs.append(ModelSpec(f"hashed k=2, {f:.0%} rows", hashed_config(log, f, 2)))
    specs.append(ModelSpec("hashed k=1, 25% rows", hashed_config(log, 0.25, 1)))
    preds, info, rows, reqs = {}, {}, None, None
    for spec in specs:
        t0 = time.perf_counter()
        r = run_model(log, split, spec, examples, train_cfg, out / spec.name.replace(" ", "_"),
                      progress=False)  # fmt: skip
        rows, reqs = r.predictions.rows, r.predictions.requests
        preds[spec.name] = r.predictions.probs
        info[spec.name] = {"table_bytes": r.memory.table_bytes, "table_rows": r.memory.rows,
                           "examples_per_s": r.state.examples_per_s,
                           "train_s": time.perf_counter() - t0}  # fmt: skip
        print(f"{spec.name}: {info[spec.name]}", flush=True)
    preds = {**baseline_predictions(log, split, rows), **preds}
    results = evaluate_predictions(log, rows, reqs, preds)
    table = format_results(results, log.actions)
    print(table)
    write_json_atomic(out / "study.json", {"results": results, "models": info,
                                           "eval_impressions": len(rows)})  # fmt: skip
    write_text_atomic(out / "study.md", table + "\n")
    plot(results, info, out / "click_auc_vs_memory.png")
    print(json.dumps({k: round(v["auc"]["click"], 4) for k, v in results.items()}, indent=1))


def plot(results: dict, info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    k2 = sorted(
        (n for n in info if n.startswith("hashed k=2")), key=lambda n: info[n]["table_bytes"]
    )
    ax.plot([info[n]["table_bytes"] / 2**20 for n in k2],
            [results[n]["auc"]["click"] for n in k2], "o-", label="hashed k=2")  # fmt: skip
    for name, marker in (("hashed k=1, 25% rows", "s"), ("full table", "*")):
        if name in info:
            ax.plot(info[name]["table_bytes"] / 2**20, results[name]["auc"]["click"], marker,
                    markersize=10, label=name)  # fmt: skip
    for name, style in (("logistic regression", "--"), ("popularity", ":")):
        if name in results:
            ax.axhline(results[name]["auc"]["click"], linestyle=style, color="gray", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("embedding table memory (MiB)")
    ax.set_ylabel("click AUC, evaluation days")
    ax.set_title("KuaiRand-Pure: click AUC against table memory")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
