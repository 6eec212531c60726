"""One experiment: split a log by days, train rankers, score baselines, compare on one split.

Used by ``hashrec demo``, ``hashrec train``/``evaluate`` and the quality study. Every model and
baseline is scored on the same evaluation impressions in the same run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hashrec.data.log import (
    ExampleConfig,
    InteractionLog,
    RowHashes,
    build_requests,
    collision_free_config,
)
from hashrec.evaluation.baselines import LogisticBaseline, popularity
from hashrec.evaluation.metrics import auc, calibration, gauc, ndcg_at_k
from hashrec.hashing.config import HashConfig
from hashrec.models.ranker import PhoenixRanker, RankerConfig
from hashrec.nn.transformer import TransformerConfig
from hashrec.training.trainer import TrainConfig, Trainer, predict, set_seed

__all__ = [
    "ModelSpec",
    "Split",
    "baseline_predictions",
    "collision_free_spec",
    "evaluate_predictions",
    "format_results",
    "hashed_config",
    "plot_run",
    "ranker_config",
    "run_model",
]


@dataclass(frozen=True)
class Split:
    """Training days [train_start, train_end], evaluation days [eval_start, eval_end] (yyyymmdd)."""

    train_end: int
    eval_start: int
    eval_end: int | None = None
    train_start: int | None = None

    def __post_init__(self) -> None:
        if self.eval_start <= self.train_end:
            raise ValueError(
                f"eval_start {self.eval_start} must come after train_end {self.train_end}"
            )
        if self.eval_end is not None and self.eval_end < self.eval_start:
            raise ValueError(f"eval_end {self.eval_end} is before eval_start {self.eval_start}")

    def masks(self, log: InteractionLog) -> tuple[np.ndarray, np.ndarray]:
        train = log.days(self.train_start, self.train_end)
        ev = log.days(self.eval_start, self.eval_end)
        if not train.any():
            raise ValueError(f"no rows on the training days (up to {self.train_end})")
        if not ev.any():
            raise ValueError(f"no rows on the evaluation days {self.eval_start}..{self.eval_end}")
        return train, ev


@dataclass
class ModelSpec:
    """What to train: table layout and architecture."""

    name: str
    hash_config: HashConfig
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        dim=32, num_layers=2, num_q_heads=2, num_kv_heads=1, widening_factor=2.0))  # fmt: skip
    vocab: dict | None = None  # set for the collision-free table


def hashed_config(
    log: InteractionLog, table_fraction: float, num_hashes: int, scheme: str = "default"
) -> HashConfig:
    """N per entity = ``table_fraction`` x distinct IDs (k hashes share that block)."""
    sizes = {
        name: max(2, math.ceil(table_fraction * len(np.unique(getattr(log, name)))))
        for name in ("user", "post", "author")
    }
    return HashConfig.sized(sizes, num_hashes, scheme, seed=1)


def collision_free_spec(
    log: InteractionLog, transformer: TransformerConfig | None = None
) -> ModelSpec:
    cfg, vocab = collision_free_config(log)
    spec = ModelSpec("full table", cfg, vocab=vocab)
    if transformer is not None:
        spec.transformer = transformer
    return spec


def ranker_config(log: InteractionLog, spec: ModelSpec) -> RankerConfig:
    return RankerConfig(
        hash=spec.hash_config,
        transformer=spec.transformer,
        actions=log.actions,
        continuous_actions=log.continuous_actions,
    )


def run_model(
    log: InteractionLog,
    split: Split,
    spec: ModelSpec,
    examples: ExampleConfig,
    train_cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``spec`` on the training days, predict the evaluation days."""
    train, ev = split.masks(log)
    set_seed(train_cfg.seed)
    hashes = RowHashes(log, spec.hash_config, spec.vocab)
    train_req = build_requests(log, train, examples, negative_pool=np.flatnonzero(train),
                               seed=train_cfg.seed)  # fmt: skip
    eval_req = build_requests(
        log, ev, ExampleConfig(**{**asdict(examples), "negatives_per_request": 0})
    )
    model = PhoenixRanker(ranker_config(log, spec))
    trainer = Trainer(model, train_cfg, run_dir, progress=progress)
    trainer.extra = {"split": asdict(split), "examples": asdict(examples),
                     "train": asdict(train_cfg), "model": spec.name}  # fmt: skip
    if resume:
        trainer.resume()
    state = trainer.fit(log, hashes, train_req)
    rows, reqs, probs = predict(model, log, hashes, eval_req)
    return {
        "model": model,
        "state": state,
        "rows": rows,
        "requests": reqs,
        "probs": probs,
        "memory": model.table.memory_report(trainer.table),
        "train_examples": int((train_req.candidates >= 0).sum()),
    }


def evaluate_predictions(
    log: InteractionLog,
    rows: np.ndarray,
    request_ids: np.ndarray,
    predictions: dict[str, np.ndarray],
    ndcg_k: int = 10,
) -> dict[str, dict]:
    """Metrics of each predictor on the same rows: AUC / calibration per action, NDCG@k on
    the real slates (click, long_view when present), GAUC of every action."""
    y = log.labels[rows]
    out = {}
    for name, p in predictions.items():
        m: dict = {"auc": {}, "calibration": {}, "gauc": {}, "ndcg": {}}
        for a, action in enumerate(log.actions):
            m["auc"][action] = auc(y[:, a], p[:, a])
            m["calibration"][action] = calibration(y[:, a], p[:, a])
            m["gauc"][action] = gauc(log.user[rows], y[:, a], p[:, a])
            if action in ("click", "long_view") or a == 0:
                m["ndcg"][action] = ndcg_at_k(request_ids, y[:, a], p[:, a], ndcg_k)
        out[name] = m
    return out


def baseline_predictions(
    log: InteractionLog, split: Split, rows: np.ndarray
) -> dict[str, np.ndarray]:
    train, _ = split.masks(log)
    preds = {"popularity": popularity(log, train, rows)}
    if len(np.unique(log.day[train])) >= 2:
        preds["logistic regression"] = LogisticBaseline().fit(log, train).predict(log, train, rows)
    return preds


def format_results(results: dict[str, dict], actions: tuple[str, ...]) -> str:
    """Markdown table: AUC per action, GAUC(long_view or first), NDCG@10 of click."""
    shown = [a for a in ("click", "long_view", "like") if a in actions] or list(actions[:3])
    g_action = "long_view" if "long_view" in actions else actions[0]
    n_action = "click" if "click" in actions else actions[0]
    head = "| model | " + " | ".join(f"AUC {a}" for a in shown)
    head += f" | GAUC {g_action} | NDCG@10 {n_action} | calib {n_action} |"
    lines = [head, "|" + "---|" * (len(shown) + 4)]
    for name, m in results.items():
        cells = [f"{m['auc'][a]:.3f}" for a in shown]
        cells += [f"{m['gauc'][g_action]:.3f}", f"{m['ndcg'].get(n_action, float('nan')):.3f}",
                  f"{m['calibration'][n_action]:.2f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_run(results: dict[str, dict], losses: dict[str, list[float]], actions: tuple[str, ...],
             path: Path) -> None:  # fmt: skip
    """PNG: training curves (left) and AUC per action, every model side by side (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, ls in losses.items():
        if ls:
            w = max(1, len(ls) // 50)
            smooth = np.convolve(ls, np.ones(w) / w, mode="valid")
            ax1.plot(np.arange(len(smooth)) + w, smooth, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_title("Training curve")
    ax1.grid(alpha=0.3)
    ax1.legend()
    names = list(results)
    x = np.arange(len(actions))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [results[name]["auc"][a] for a in actions]
        ax2.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax2.set_xticks(x)
    ax2.set_xticklabels(actions, rotation=30, ha="right")
    lowest = min((v for m in results.values() for v in m["auc"].values() if v == v), default=0.5)
    ax2.set_ylim(min(0.45, lowest - 0.05), 1.0)
    ax2.axhline(0.5, color="gray", lw=0.8)
    ax2.set_ylabel("AUC (evaluation days)")
    ax2.set_title("AUC per action")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
