"""Is the Phoenix ranker worth shipping? Tuning on validation days, then an honest comparison.

    # 1. sweep: train 2022-04-25..04-30, early-stop on 05-01, score on 05-02 (no evaluation day)
    OMP_NUM_THREADS=1 python benchmarks/study_ranker.py sweep --configs base,alloc,dropout
    # 2. final: the chosen defaults, seeds 0,1,2, train 04-25..05-02 (05-02 as the early-stopping
    #    validation day), evaluate 05-03..05-05 against popularity, logistic regression, LightGBM
    OMP_NUM_THREADS=1 python benchmarks/study_ranker.py final --seeds 0,1,2

The sweep never reads the evaluation days: its "eval" split is 2022-05-02, the last training
day of the final split. Each finished run is appended to ``runs/study_ranker/<phase>.jsonl`` as
soon as it ends, so a partial study is readable; ``report`` prints the tables (mean ± std over
seeds). The chosen configuration is ``DEFAULTS`` below, the CLI's defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hashrec.data import ExampleConfig, load_kuairand
from hashrec.data.tables import table_config
from hashrec.evaluation.experiment import (
    ModelSpec,
    Split,
    baseline_predictions,
    collision_free_config,
    collision_free_spec,
    ensemble_probs,
    evaluate_predictions,
    hashed_config,
    run_model,
)
from hashrec.evaluation.report import aggregate_seeds, format_results
from hashrec.nn.transformer import TransformerConfig
from hashrec.training.trainer import TrainConfig

# The defaults of `hashrec train` / `demo` (src/hashrec/cli/common.py), chosen by the sweep,
# but for the dense weights' moving average (`--ema-decay 0.998`), which the sweep chose last:
# the configurations named `...ema` add it, so every earlier row keeps its meaning.
DEFAULTS = {
    "weights": {"user": 1.0, "post": 4.0, "author": 2.0, "feature": 2.0},
    "dropout": 0.1,
    "weight_decay": 0.01,
    "epochs": 3,
    "action_weights": {},
    "side": True,
}

# loss weight 3 on every KuaiRand action but click and long_view
RARE_WEIGHTS = {a: 3.0 for a in ("like", "follow", "comment", "forward", "hate", "profile_enter")}

# the CLI's default scheme: the hybrid table, half its bytes on private rows
HYBRID = {**DEFAULTS, "scheme": "hybrid", "head_share": 0.5}
# ... with the action weights, the baselines' smoothed rates as features and --refit
RATERARE = {**HYBRID, "action_weights": RARE_WEIGHTS, "rates": True, "refit": True}

CONFIGS: dict[str, dict] = {
    "noside": {**DEFAULTS, "side": False, "weights": None},
    "uniform": {**DEFAULTS, "weights": None},
    "alloc": {**DEFAULTS, "dropout": 0.0},
    "dropout": DEFAULTS,
    "dropout3": {**DEFAULTS, "dropout": 0.3},
    "wd": {**DEFAULTS, "weight_decay": 0.1},
    "rare": {
        **DEFAULTS,
        "action_weights": {"like": 3.0, "follow": 3.0, "comment": 3.0, "forward": 3.0, "hate": 3.0},
    },
    "wide": {**DEFAULTS, "dim": 64},
    # the defaults (hybrid) at D = 64, and with a history of 64 / 128 events
    "hybridwide": {**HYBRID, "dim": 64},
    # ... at D = 64 within the defaults' bytes (12.5% of its own collision-free table)
    "hybridwide12": {**HYBRID, "dim": 64, "fraction": 0.125},
    "hybridh64": {**HYBRID, "history": 64},
    "hybridh128": {**HYBRID, "history": 128},
    "rates": {**DEFAULTS, "rates": True},
    # the hybrid table (the CLI default scheme) at two shares of private rows
    "hybrid": HYBRID,
    "hybrid85": {**DEFAULTS, "scheme": "hybrid", "head_share": 0.85},
    "full": {**DEFAULTS, "scheme": "full"},
    # the hybrid at 10% and 5% of the collision-free table's bytes
    "hybrid10": {**HYBRID, "fraction": 0.10},
    "hybrid5": {**HYBRID, "fraction": 0.05},
    # the defaults with loss weight 3 on every action but click and long_view
    "hybridrare": {**HYBRID, "action_weights": RARE_WEIGHTS},
    # ... and with rows moved from posts and authors to users
    "hybridu": {**HYBRID, "weights": {"user": 4.0, "post": 4.0, "author": 1.0, "feature": 1.0}},
    # ... and most of the user block as private rows (the most frequent users own one each)
    "hybriduu": {
        **DEFAULTS,
        "scheme": "hybrid",
        "head_share": 0.85,
        "weights": {"user": 8.0, "post": 4.0, "author": 1.0, "feature": 1.0},
    },
    # the defaults' epoch count (2, chosen on the validation day by every seed), then trained
    # on every training day, the validation day included (no early stopping)
    "refit2": {**HYBRID, "epochs": 2, "val_days": 0},
    "refit1": {**HYBRID, "epochs": 1, "val_days": 0},
    # ... with loss weight 3 on the six rarer actions, for the epochs hybridrare's validation
    # day chose: 2 (seed 0) or 1 (seeds 1, 2)
    "refitrare": {
        **HYBRID,
        "epochs": 2,
        "val_days": 0,
        "action_weights": RARE_WEIGHTS,
    },
    "refitrare1": {
        **HYBRID,
        "epochs": 1,
        "val_days": 0,
        "action_weights": RARE_WEIGHTS,
    },
    # TrainConfig.refit (`--refit`): the epochs each seed's validation run chose, then every day;
    # with the action weights, and with those and the baselines' smoothed rates as features
    "hybridrefit": {**HYBRID, "refit": True},
    # the dense learning rate decaying to 0 over two epochs (the count validation chose)
    "hybridlin2": {
        **HYBRID,
        "epochs": 2,
        "lr_schedule": "linear",
    },
    "hybridcos2": {
        **HYBRID,
        "epochs": 2,
        "lr_schedule": "cosine",
    },
    # twice the requests per step (fewer, larger steps: less per-operation overhead), at the
    # same and at twice the dense learning rate
    "hybridb256": {**HYBRID, "batch_size": 256},
    "hybridb256lr": {
        **HYBRID,
        "batch_size": 256,
        "lr": 4e-3,
    },
    "rarerefit": {
        **HYBRID,
        "action_weights": RARE_WEIGHTS,
        "refit": True,
    },
    "raterarerefit": RATERARE,
    # ... at half the bytes (two of them within the budget: an ensemble, diagnostic)
    "raterare12": {**RATERARE, "fraction": 0.125},
    # ... at 10% of the bytes (hybrid10 was level with 24.4% on the AUCs, steadier)
    "raterare10": {**RATERARE, "fraction": 0.10},
    # every epoch in time order (the last steps on the most recent day)
    "hybridtime": {**HYBRID, "order": "time"},
    "raterarertime": {**RATERARE, "order": "time"},
    # rates and refit without the action weights
    "raterefit": {**HYBRID, "rates": True, "refit": True},
    # ... at D = 64 (25% of its own collision-free table's bytes)
    "raterarewide": {**RATERARE, "dim": 64},
    # ... with the dense learning rate's cosine decay
    "raterarecos": {**RATERARE, "lr_schedule": "cosine"},
    # the dense transformer larger (the table's bytes unchanged)
    "hybridl3": {**HYBRID, "layers": 3},
    "hybridl4": {**HYBRID, "layers": 4},
    "hybridff4": {**HYBRID, "widening": 4.0},
    "hybridq4": {**HYBRID, "heads": 4, "kv_heads": 2},
    # + the pairwise loss over each user's candidates (TrainConfig.pairwise_weight)
    "pair03": {**HYBRID, "pairwise": 0.3},
    "pair1": {**HYBRID, "pairwise": 1.0},
    "pair01": {**HYBRID, "pairwise": 0.1},
    "pair003": {**HYBRID, "pairwise": 0.03},
    # the user-grouped order alone (a weight too small to matter)
    "grouped": {**HYBRID, "pairwise": 1e-9},
    # the table's row-wise Adagrad learning rate (the CLI's --table-lr, 0.05) and the dense
    # AdamW's (--lr, 2e-3) at 128 requests per step
    "hybridtlr02": {**HYBRID, "table_lr": 0.02},
    "hybridtlr1": {**HYBRID, "table_lr": 0.1},
    "hybridtlr2": {**HYBRID, "table_lr": 0.2},
    "hybridlr1": {**HYBRID, "lr": 1e-3},
    "hybridlr4": {**HYBRID, "lr": 4e-3},
    # a moving average of the dense weights (decay 0.998, ramped up over the first steps)
    "hybridema": {**HYBRID, "ema": 0.998},
    "raterareema": {**RATERARE, "ema": 0.998},
    "rarerefitema": {**HYBRID, "action_weights": RARE_WEIGHTS, "refit": True, "ema": 0.998},
    "fullema": {**DEFAULTS, "scheme": "full", "ema": 0.998},
    # a per-user logit offset for click and long_view (65,536 rows: 9.2% of the collision-free
    # table's bytes) beside a hybrid table at 15% of them (14.7%): 23.9% in all
    "userbias": {
        **HYBRID,
        "fraction": 0.15,
        "ema": 0.998,
        "user_bias": 65_536,
        "user_bias_actions": ("click", "long_view"),
    },
    # ... 32,768 rows (4.6%) beside a table at 20%; long_view's offset alone at 65,536 rows
    # (4.6%) beside 20%; every action's at 32,768 rows (18.5%) beside 6.5%
    "userbias32k": {
        **HYBRID,
        "fraction": 0.20,
        "ema": 0.998,
        "user_bias": 32_768,
        "user_bias_actions": ("click", "long_view"),
    },
    "userbiaslv": {
        **HYBRID,
        "fraction": 0.20,
        "ema": 0.998,
        "user_bias": 65_536,
        "user_bias_actions": ("long_view",),
    },
    # ... with the action weights, the smoothed rates and --refit (`raterareema`'s settings)
    "userbiasrr": {
        **RATERARE,
        "fraction": 0.15,
        "ema": 0.998,
        "user_bias": 65_536,
        "user_bias_actions": ("click", "long_view"),
    },
    "userbiasall": {**HYBRID, "fraction": 0.065, "ema": 0.998, "user_bias": 32_768},
    # loss weight 5 on the six rarer actions
    "hybridrare5": {**HYBRID, "action_weights": {a: 5.0 for a in RARE_WEIGHTS}},
    # ... and with rows moved from users (whose history speaks for them) to posts
    "hybridp": {
        **DEFAULTS,
        "scheme": "hybrid",
        "head_share": 0.85,
        "weights": {"user": 0.5, "post": 6.0, "author": 2.0, "feature": 2.0},
    },
}

SWEEP = Split(train_end=20220501, eval_start=20220502, eval_end=20220502)
FINAL = Split(train_end=20220502, eval_start=20220503, eval_end=20220505)


def spec_for(log, name: str, cfg: dict, split: Split) -> tuple[ModelSpec, TrainConfig]:
    dim = cfg.get("dim", 32)
    tf = TransformerConfig(dim=dim, num_layers=cfg.get("layers", 2),
                           num_q_heads=cfg.get("heads", 2), num_kv_heads=cfg.get("kv_heads", 1),
                           widening_factor=cfg.get("widening", 2.0))  # fmt: skip
    # 24% rows per entity without weights: 25% would overshoot by the reserved rows
    frac = cfg.get("fraction", 0.25 if cfg["weights"] is not None else 0.24)
    scheme = cfg.get("scheme", "multihash")
    if scheme == "full":  # the collision-free table (one row per ID), same training
        spec = collision_free_spec(log, tf, cfg["dropout"])
        spec.name, spec.side_features = name, cfg["side"]
        spec.rate_features = cfg.get("rates", False)
        hc = None
    elif scheme == "multihash":
        hc = hashed_config(log, frac, 2, weights=cfg["weights"])
    else:  # the frequency map is counted on the split's training days only
        hc = table_config(log, split.masks(log)[0], scheme, frac, 2, dim=dim,
                          weights=cfg["weights"], head_share=cfg["head_share"])  # fmt: skip
    if hc is not None:
        spec = ModelSpec(name, hc, tf, dropout=cfg["dropout"], side_features=cfg["side"],
                         rate_features=cfg.get("rates", False),
                         user_bias_rows=cfg.get("user_bias", 0),
                         user_bias_actions=cfg.get("user_bias_actions", ()))  # fmt: skip
    train = TrainConfig(epochs=cfg["epochs"], weight_decay=cfg["weight_decay"],
                        action_weights=cfg["action_weights"], patience=1,
                        val_days=cfg.get("val_days", 1), refit=cfg.get("refit", False),
                        pairwise_weight=cfg.get("pairwise", 0.0),
                        lr_schedule=cfg.get("lr_schedule", "constant"),
                        batch_size=cfg.get("batch_size", 128), lr=cfg.get("lr", 2e-3),
                        table_lr=cfg.get("table_lr", 0.05),
                        order=cfg.get("order", "shuffled"),
                        ema_decay=cfg.get("ema", 0.0))  # fmt: skip
    return spec, train


def full_table_bytes(log, dim: int = 32) -> int:
    """Bytes of the collision-free table (one fp32 row per distinct ID and side value)."""
    cfg, _ = collision_free_config(log)
    return cfg.num_rows * dim * 4


def _record(path: Path, rec: dict, what: str, tail: str) -> None:
    """Append ``rec`` to ``path`` and print its headline figures."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    m = rec["metrics"]
    print(f"{what}: click {m['auc']['click']:.4f} long_view {m['auc']['long_view']:.4f} "
          f"like {m['auc']['like']:.4f} GAUC long_view {m['gauc']['long_view']:.4f}; {tail}",
          flush=True)  # fmt: skip


def run_phase(args, phase: str, split: Split, names: list[str], seeds: list[int]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = load_kuairand(args.data)
    plain = load_kuairand(args.data, side_features=False)
    full_bytes = full_table_bytes(log)
    rows = reqs = None
    k = args.ensemble
    for seed in seeds:
        for name in names:
            cfg = CONFIGS[name]
            lg = log if cfg["side"] else plain
            probs = []
            # --ensemble K: K models (seeds K*seed .. K*seed + K - 1), each recorded as
            # "<name> (xK members)" (a row apart from runs of single seeds, which reuse seeds
            # 0..), then their ensemble as "<name>xK" with this seed
            member = name if k == 1 else f"{name} (x{k} members)"
            for model_seed in [seed] if k == 1 else range(k * seed, k * seed + k):
                spec, train = spec_for(lg, name, cfg, split)
                train = replace(train, seed=model_seed)
                examples = ExampleConfig(history_len=cfg.get("history", 32))
                t0 = time.perf_counter()
                r = run_model(lg, split, spec, examples, train,
                              out / "runs" / f"{phase}-{name}-{model_seed}",
                              progress=False)  # fmt: skip
                rows, reqs = r.predictions.rows, r.predictions.requests
                probs.append(r.predictions.probs)
                m = evaluate_predictions(log, rows, reqs, {name: r.predictions.probs})[name]
                bias = r.model.user_bias  # its bytes count in the budget with the table's
                rec = {"phase": phase, "name": member, "seed": model_seed, "metrics": m,
                       "validation": r.state.validation, "best_epoch": r.state.best_epoch,
                       "table_bytes": r.memory.table_bytes + (bias.num_bytes if bias else 0),
                       "full_table_bytes": full_bytes,
                       "train_s": time.perf_counter() - t0, "config": cfg,
                       "train": asdict(train)}  # fmt: skip
                _record(out / f"{phase}.jsonl", rec, f"{phase} {member} seed {model_seed}",
                        f"best epoch {r.state.best_epoch}, table "
                        f"{rec['table_bytes'] / full_bytes:.1%} of full, "
                        f"{rec['train_s']:.0f} s")  # fmt: skip
            if k > 1:
                ens = f"{name}x{k}"
                m = evaluate_predictions(log, rows, reqs, {ens: ensemble_probs(probs)})[ens]
                rec = {"phase": phase, "name": ens, "seed": seed, "metrics": m, "config": cfg,
                       "models": list(range(k * seed, k * seed + k))}  # fmt: skip
                _record(out / f"{phase}.jsonl", rec, f"{phase} {ens} seed {seed}",
                        f"ensemble of seeds {rec['models']}")  # fmt: skip
    if args.baselines and rows is not None:
        t0 = time.perf_counter()
        base = baseline_predictions(log, split, rows)
        m = evaluate_predictions(log, rows, reqs, base)
        for name, mm in m.items():
            with open(out / f"{phase}.jsonl", "a") as f:
                f.write(json.dumps({"phase": phase, "name": name, "seed": 0, "metrics": mm,
                                    "train_s": time.perf_counter() - t0}) + "\n")  # fmt: skip
        print(f"{phase} baselines: " + ", ".join(
            f"{n} click {v['auc']['click']:.4f}" for n, v in m.items()), flush=True)  # fmt: skip


def report(args) -> None:
    """Tables (mean ± std over seeds) of every ``<phase>.jsonl`` under ``--out``, and a plot."""
    from hashrec.evaluation.report import plot_run

    out = Path(args.out)
    log = load_kuairand(args.data, side_features=False)
    for phase in ("sweep", "final"):
        paths = sorted(out.glob(f"**/{phase}.jsonl"))
        if not paths:
            continue
        runs: dict[str, list[dict]] = {}
        facts: dict[str, list[str]] = {}
        for path in paths:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                runs.setdefault(rec["name"], []).append(rec["metrics"])
                if "table_bytes" in rec:
                    facts.setdefault(rec["name"], []).append(
                        f"seed {rec['seed']}: best epoch {rec['best_epoch'] + 1}, validation "
                        f"{[round(v, 4) for v in rec['validation']]}, table "
                        f"{rec['table_bytes'] / rec['full_table_bytes']:.1%} of full, "
                        f"{rec['train_s']:.0f} s"
                    )
        split = SWEEP if phase == "sweep" else FINAL
        ev = log.days(split.eval_start, split.eval_end)
        positives = dict(zip(log.actions, log.labels[ev].sum(0).tolist(), strict=True))
        results = aggregate_seeds(runs)
        table = format_results(results, log.actions, positives)
        what = "scored on 2022-05-02, never an evaluation day" if phase == "sweep" else (
            "evaluation days 2022-05-03..05-05")  # fmt: skip
        text = f"## {phase} ({what}; data {args.data})\n\n{table}\n"
        for name, lines in facts.items():
            text += "\n" + "\n".join(f"- {name}, {x}" for x in lines)
        print(text)
        (out / f"{phase}.md").write_text(text + "\n")
        plot_run(results, {}, log.actions, out / f"{phase}.png", positives)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("sweep", "final", "report"))
    p.add_argument("--data", default="../shared/data/kuairand-pure")
    p.add_argument("--configs", default="dropout", help="comma-separated names of CONFIGS")
    p.add_argument("--seeds", default="0")
    p.add_argument("--baselines", action="store_true", help="also score the baselines")
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="per seed s, train K models (seeds K*s .. K*s+K-1) and also record "
                   "their ensemble (ensemble_probs) as <config>xK")  # fmt: skip
    p.add_argument("--out", default="runs/study_ranker")
    args = p.parse_args()
    if args.ensemble < 1:
        p.error(f"--ensemble must be >= 1, got {args.ensemble}")
    if args.phase == "report":
        report(args)
        return
    names = args.configs.split(",")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; known: {sorted(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    run_phase(args, args.phase, SWEEP if args.phase == "sweep" else FINAL, names, seeds)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
