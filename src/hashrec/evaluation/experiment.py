"""One experiment: split a log by days, train rankers, score baselines, compare on one split.

Used by ``hashrec demo``, ``hashrec train``/``evaluate`` and the quality study. Every model and
baseline is scored on the same evaluation impressions in the same run.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hashrec.data import (
    ExampleConfig,
    InteractionLog,
    RowHashes,
    build_requests,
    collision_free_config,
)
from hashrec.evaluation.baselines import LogisticBaseline, popularity
from hashrec.evaluation.metrics import auc, calibration, gauc, ndcg_at_k
from hashrec.files import write_json_atomic, write_text_atomic
from hashrec.hashing.config import HashConfig
from hashrec.models.ranker import PhoenixRanker, RankerConfig
from hashrec.nn.table import MemoryReport
from hashrec.nn.transformer import TransformerConfig
from hashrec.training.checkpoint import read_checkpoint_metadata
from hashrec.training.distributed import env_world
from hashrec.training.resume import check_resumable
from hashrec.training.trainer import (
    Predictions,
    TrainConfig,
    Trainer,
    TrainState,
    predict,
    set_seed,
)

__all__ = [
    "ExperimentResult",
    "ModelRun",
    "ModelSpec",
    "Split",
    "baseline_predictions",
    "check_resume",
    "collision_free_spec",
    "data_fingerprint",
    "evaluate_predictions",
    "hashed_config",
    "ranker_config",
    "run",
    "run_model",
    "run_record",
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
    """The ranker for ``log``; refuses a log the model cannot take (e.g. a surface >= 16)
    here, before anything is trained or written."""
    cfg = RankerConfig(
        hash=spec.hash_config,
        transformer=spec.transformer,
        actions=log.actions,
        continuous_actions=log.continuous_actions,
    )
    if len(log) and int(log.surface.max()) >= cfg.num_surfaces:
        row = int(np.argmax(log.surface))
        raise ValueError(
            f"the log's surface column holds {int(log.surface[row])} (user {int(log.user[row])}, "
            f"day {int(log.day[row])}): the ranker has {cfg.num_surfaces} product surfaces, "
            f"0..{cfg.num_surfaces - 1}"
        )
    return cfg


def data_fingerprint(log: InteractionLog, rows: np.ndarray) -> str:
    """SHA-256 of the log's ``rows`` (a mask or indices): IDs, surfaces, times, labels."""
    h = hashlib.sha256()
    for a in (log.user, log.post, log.author, log.surface, log.time, log.day, log.labels,
              log.continuous):  # fmt: skip
        h.update(np.ascontiguousarray(a[rows]).tobytes())
    return h.hexdigest()


def run_record(log: InteractionLog, split: Split, spec: ModelSpec, examples: ExampleConfig) -> dict:
    """What a run's checkpoint records besides the model and training settings (compared on
    resume): split, example settings, model name, fingerprint of the training rows."""
    train, _ = split.masks(log)
    return {"split": asdict(split), "examples": asdict(examples), "model": spec.name,
            "data": data_fingerprint(log, train)}  # fmt: skip


def check_resume(
    checkpoint: Path,
    log: InteractionLog,
    split: Split,
    spec: ModelSpec,
    examples: ExampleConfig,
    train_cfg: TrainConfig,
) -> bool:
    """Before anything is written: False if there is no ``checkpoint``; ValueError if resuming
    it would change training (``hashrec.training.resume``); True if it can be resumed."""
    if not checkpoint.exists():
        return False
    meta = read_checkpoint_metadata(checkpoint)
    saved = {"model_config": meta["model_config"], **meta["extra"]}
    current = {"model_config": ranker_config(log, spec).to_dict(), "train": asdict(train_cfg),
               **run_record(log, split, spec, examples)}  # fmt: skip
    check_resumable(checkpoint, saved, current, meta["train_state"], train_cfg.epochs)
    return True


@dataclass
class ModelRun:
    """One trained model and its predictions on the evaluation days."""

    model: PhoenixRanker
    state: TrainState
    predictions: Predictions | None  # None on the ranks > 0 of a multi-process run
    memory: MemoryReport
    train_examples: int


def run_model(
    log: InteractionLog,
    split: Split,
    spec: ModelSpec,
    examples: ExampleConfig,
    train_cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> ModelRun:
    """Train ``spec`` on the training days, predict the evaluation days (rank 0 only)."""
    train, ev = split.masks(log)
    set_seed(train_cfg.seed)
    hashes = RowHashes(log, spec.hash_config, spec.vocab)
    train_req = build_requests(log, train, examples, negative_pool=np.flatnonzero(train),
                               seed=train_cfg.seed)  # fmt: skip
    eval_req = build_requests(
        log, ev, ExampleConfig(**{**asdict(examples), "negatives_per_request": 0})
    )
    model = PhoenixRanker(ranker_config(log, spec))
    trainer = Trainer(model, train_cfg, run_dir, progress=progress, device=device)
    trainer.extra = run_record(log, split, spec, examples)
    if resume:
        trainer.resume()
    state = trainer.fit(log, hashes, train_req)
    return ModelRun(
        model=model,
        state=state,
        predictions=predict(model, log, hashes, eval_req) if trainer.ctx.is_main else None,
        memory=model.table.memory_report(trainer.table),
        train_examples=int((train_req.candidates >= 0).sum()),
    )


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


@dataclass
class ExperimentResult:
    """What ``run`` measured: metrics per model and baseline, and facts about the run."""

    results: dict[str, dict]  # model or baseline name -> {"auc": {action: v}, "gauc": ...}
    models: dict[str, dict]  # trained model name -> throughput and table size
    table: str  # the Markdown results table
    eval_impressions: int
    eval_users: int
    wall_s: float


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(
    log: InteractionLog,
    split: Split,
    spec: ModelSpec,
    examples: ExampleConfig,
    train_cfg: TrainConfig,
    out: Path,
    *,
    with_full_table: bool = False,
    also: Sequence[ModelSpec] = (),
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> ExperimentResult | None:
    """Train ``spec`` (then each of ``also``, then the collision-free table), score the
    baselines, evaluate all of them on the same impressions; write ``metrics.json``,
    ``results.md`` and ``results.png`` to ``out`` (``spec``'s checkpoint lands there while
    training, the others' in subfolders).

    Under torchrun every rank trains; rank 0 alone evaluates, writes and reports (the others
    return None once trained).
    """
    from hashrec.evaluation.report import format_results, plot_run

    main_rank = env_world()[0] == 0
    if not main_rank:
        say, progress = (lambda _: None), False
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    specs = [spec, *also] + (
        [collision_free_spec(log, spec.transformer)] if with_full_table else []
    )
    preds, losses, info = {}, {}, {}
    rows = reqs = None
    for sp in specs:
        say(f"training {sp.name} ...")
        sub = (
            out if sp is spec else out / ("full_table" if sp.vocab is not None else _slug(sp.name))
        )
        r = run_model(log, split, sp, examples, train_cfg, sub, resume=resume and sp is spec,
                      progress=progress, device=device)  # fmt: skip
        if r.predictions is None:
            continue
        if rows is not None and not np.array_equal(rows, r.predictions.rows):
            raise RuntimeError("models were evaluated on different rows")
        rows, reqs = r.predictions.rows, r.predictions.requests
        preds[sp.name], losses[sp.name] = r.predictions.probs, r.state.losses
        info[sp.name] = {"examples_per_s": r.state.examples_per_s,
                         "train_examples": r.train_examples,
                         "table_bytes": r.memory.table_bytes,
                         "table_rows": r.memory.rows}  # fmt: skip
    if not main_rank:
        return None
    assert rows is not None and reqs is not None
    say("scoring baselines ...")
    preds = {**baseline_predictions(log, split, rows), **preds}
    results = evaluate_predictions(log, rows, reqs, preds)
    res = ExperimentResult(
        results=results,
        models=info,
        table=format_results(results, log.actions),
        eval_impressions=len(rows),
        eval_users=len(np.unique(log.user[rows])),
        wall_s=time.perf_counter() - t0,
    )
    write_json_atomic(out / "metrics.json", {"results": results, "models": info,
                      "eval_impressions": res.eval_impressions, "wall_s": res.wall_s})  # fmt: skip
    write_text_atomic(out / "results.md", res.table + "\n")
    plot_run(results, losses, log.actions, out / "results.png")
    return res
