"""Study: table layouts at equal bytes on the 11 KuaiRand-Pure days.

    python benchmarks/study_tables.py run --worker 0 --workers 2   # one of two parallel workers
    python benchmarks/study_tables.py report                       # table + plot from what is done

Train 2022-04-25..05-02, evaluate 05-03..05-05. For each budget (a fraction of the bytes of the
full table: one row per distinct ID, plus its row-wise Adagrad state) and each scheme -- Phoenix
multi-hash k = 1, 2 (3), the frequency-aware hybrid, importance-weighted hash embeddings,
quotient-remainder -- and for the full table: train with each seed, predict the evaluation days.
Nothing is tuned (the layouts' shares are fixed in ``hashrec.data.tables``). Each finished run
writes ``runs/study_tables/<scheme>_<fraction>_s<seed>.npz`` (skipped when present, so workers can
resume); ``report`` scores every finished run on the same evaluation impressions and writes
``study.json``, ``study.md`` and ``quality_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hashrec.data import ExampleConfig, load_kuairand
from hashrec.data.tables import table_config
from hashrec.evaluation.experiment import (
    ModelSpec,
    Split,
    collision_free_spec,
    evaluate_predictions,
    run_model,
)
from hashrec.files import write_json_atomic, write_text_atomic
from hashrec.training.trainer import TrainConfig

SPLIT = Split(train_end=20220502, eval_start=20220503, eval_end=20220505, train_start=20220425)
SCHEMES = {  # name -> (layout, k)
    "multihash k=1": ("multihash", 1),
    "multihash k=2": ("multihash", 2),
    "multihash k=3": ("multihash", 3),
    "hybrid k=2": ("hybrid", 2),
    "weighted k=2": ("weighted", 2),
    "qr": ("qr", 2),
}
METRICS = (("auc", "click"), ("auc", "long_view"), ("auc", "like"), ("gauc", "long_view"))


def job_name(scheme: str, fraction: float | None, seed: int) -> str:
    key = scheme.replace(" ", "").replace("=", "")
    return f"full_s{seed}" if fraction is None else f"{key}_{fraction:g}_s{seed}"


def jobs(args) -> list[tuple[str, float | None, int]]:
    """Seed-major order, so that every scheme has one seed before any has three."""
    out = []
    for seed in args.seeds:
        if not args.no_full:
            out.append(("full table", None, seed))
        for f in args.fractions:
            out += [(s, f, seed) for s in args.schemes]
    return out


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = load_kuairand(args.data)
    train, _ = SPLIT.masks(log)
    for i, (scheme, frac, seed) in enumerate(jobs(args)):
        name = job_name(scheme, frac, seed)
        if i % args.workers != args.worker or (out / f"{name}.npz").exists():
            continue
        if frac is None:
            spec = collision_free_spec(log)
        else:
            layout, k = SCHEMES[scheme]
            spec = ModelSpec(name, table_config(log, train, layout, frac, k, dim=32))
        t0 = time.perf_counter()
        r = run_model(log, SPLIT, spec, ExampleConfig(), TrainConfig(epochs=args.epochs,
                      seed=seed), out / "ckpt" / name, progress=False)  # fmt: skip
        m = r.memory
        meta = {"scheme": scheme, "fraction": frac, "seed": seed, "epochs": args.epochs,
                "table_bytes": m.table_bytes, "optimizer_bytes": m.optimizer_bytes,
                "frequency_map_bytes": m.frequency_map_bytes, "total_bytes": m.total_bytes,
                "rows": m.rows, "train_s": time.perf_counter() - t0}  # fmt: skip
        np.savez(out / f"{name}.tmp.npz", rows=r.predictions.rows,
                 requests=r.predictions.requests, probs=r.predictions.probs,
                 meta=json.dumps(meta))  # fmt: skip
        (out / f"{name}.tmp.npz").rename(out / f"{name}.npz")
        print(f"{name}: {meta}", flush=True)


def report(args) -> None:
    out = Path(args.out)
    log = load_kuairand(args.data)
    runs, rows, reqs = {}, None, None
    for path in sorted(out.glob("*_s[0-9].npz")):
        z = np.load(path)
        if rows is None:
            rows, reqs = z["rows"], z["requests"]
        elif not np.array_equal(rows, z["rows"]):
            raise RuntimeError(f"{path.name} was evaluated on other rows")
        runs[path.stem] = (json.loads(str(z["meta"])), z["probs"])
    if not runs:
        raise SystemExit(f"no finished runs in {out}")
    scored = evaluate_predictions(log, rows, reqs, {k: p for k, (_, p) in runs.items()})
    groups: dict[tuple, list] = {}
    for k, (meta, _) in runs.items():
        vals = [scored[k][kind][a] for kind, a in METRICS]
        groups.setdefault((meta["scheme"], meta["fraction"]), []).append((meta, vals))
    summary = []
    for (scheme, frac), items in groups.items():
        v = np.array([x[1] for x in items])
        summary.append({"scheme": scheme, "fraction": frac, "seeds": len(items),
                        "total_bytes": items[0][0]["total_bytes"],
                        "epochs": items[0][0]["epochs"],
                        "mean": v.mean(0).tolist(),
                        "spread": (v.max(0) - v.min(0)).tolist()})  # fmt: skip
    order = {s: i for i, s in enumerate(["full table", *SCHEMES])}
    summary.sort(key=lambda s: (s["fraction"] or 9, order.get(s["scheme"], 99)))
    full = next((s for s in summary if s["fraction"] is None), None)
    metrics = [f"{k} {a}" for k, a in METRICS]
    write_json_atomic(
        out / "study.json", {"summary": summary, "eval_impressions": len(rows), "metrics": metrics}
    )
    table = format_table(summary, full)
    write_text_atomic(out / "study.md", table + "\n")
    print(table)
    plot(summary, full, out / "quality_vs_bytes.png")


def format_table(summary: list[dict], full: dict | None) -> str:
    head = ("| budget | scheme | MiB | seeds | AUC click | AUC long_view | AUC like "
            "| GAUC long_view | vs full: click / like / GAUC |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = [f"{m:.4f} ± {sp / 2:.4f}" for m, sp in zip(s["mean"], s["spread"], strict=True)]
        delta = ""
        if full is not None and s is not full:
            d = [s["mean"][i] - full["mean"][i] for i in (0, 2, 3)]
            delta = " / ".join(f"{x:+.4f}" for x in d)
        budget = "100%" if s["fraction"] is None else f"{s['fraction']:.0%}"
        lines.append(f"| {budget} | {s['scheme']} | {s['total_bytes'] / 2**20:.2f} "
                     f"| {s['seeds']} | " + " | ".join(cells) + f" | {delta} |")  # fmt: skip
    return "\n".join(lines)


def plot(summary: list[dict], full: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    axes = axes.ravel()
    ticks = sorted({s["total_bytes"] / 2**20 for s in summary})
    schemes = [s for s in dict.fromkeys(x["scheme"] for x in summary) if s != "full table"]
    for ax, (i, (kind, action)) in zip(axes, enumerate(METRICS), strict=True):
        for scheme in schemes:
            pts = sorted((s for s in summary if s["scheme"] == scheme),
                         key=lambda s: s["total_bytes"])  # fmt: skip
            x = [s["total_bytes"] / 2**20 for s in pts]
            ax.errorbar(x, [s["mean"][i] for s in pts], yerr=[s["spread"][i] / 2 for s in pts],
                        marker="o", capsize=3, label=scheme)  # fmt: skip
        if full is not None:
            ax.errorbar([full["total_bytes"] / 2**20], [full["mean"][i]],
                        yerr=[full["spread"][i] / 2], marker="*", markersize=12, color="black",
                        linestyle="none", label="full table")  # fmt: skip
            ax.axhline(full["mean"][i], color="black", linestyle=":", alpha=0.5)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("table + optimizer + frequency map (MiB)")
        ax.set_title(f"{kind.upper()} {action}")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[::2]:
        ax.set_ylabel("05-03..05-05, mean of seeds (bar: half range)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("KuaiRand-Pure: quality against bytes, one line per table scheme")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--data", default="../shared/data/kuairand-pure")
    p.add_argument("--out", default="runs/study_tables")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--fractions", default="0.25,0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--schemes", default="multihash k=2,hybrid k=2,weighted k=2,qr,multihash k=1")
    p.add_argument("--no-full", action="store_true", help="skip the full-table runs")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    args.fractions = [float(x) for x in args.fractions.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.schemes = [s.strip() for s in args.schemes.split(",")]
    unknown = set(args.schemes) - set(SCHEMES)
    if unknown:
        p.error(f"unknown schemes {sorted(unknown)}, expected {list(SCHEMES)}")
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    main()
