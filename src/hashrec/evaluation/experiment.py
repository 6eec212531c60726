"""One experiment: split a log by days, train rankers, score baselines, compare on one split.

Used by ``hashrec demo``, ``hashrec train``/``evaluate`` and the quality study. Every model and
baseline is scored on the same evaluation impressions in the same run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from hashrec.data import (
    ExampleConfig,
    InteractionLog,
    RowHashes,
    SideColumns,
    build_requests,
    collision_free_config,
)
from hashrec.data.side_store import Keyed, RateTables, SideStore
from hashrec.data.tables import ENTITY_WEIGHTS, table_config
from hashrec.evaluation.baselines import (
    GBDTBaseline,
    LogisticBaseline,
    _logit,
    gbdt_available,
    popularity,
    smoothed_rates,
)
from hashrec.evaluation.metrics import auc, calibration, gauc, ndcg_at_k
from hashrec.files import write_json_atomic, write_text_atomic
from hashrec.hashing.config import HashConfig
from hashrec.models.ranker import PhoenixRanker, RankerConfig
from hashrec.nn.side import SideConfig
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
    "ENTITY_WEIGHTS",
    "ExperimentResult",
    "ModelRun",
    "ModelSpec",
    "Split",
    "baseline_predictions",
    "check_resume",
    "checkpoint_log",
    "collision_free_spec",
    "data_fingerprint",
    "ensemble_probs",
    "evaluate_predictions",
    "hashed_config",
    "model_log",
    "ranker_config",
    "rate_tables",
    "run",
    "run_model",
    "run_record",
    "side_config",
    "validation_split",
    "with_rate_features",
]


@dataclass(frozen=True)
class Split:
    """Training days [train_start, train_end], evaluation days [eval_start, eval_end] (yyyymmdd).

    >>> Split(train_end=20220502, eval_start=20220503, eval_end=20220505).eval_start
    20220503
    >>> Split(train_end=20220503, eval_start=20220503)
    Traceback (most recent call last):
    ...
    ValueError: eval_start 20220503 must come after train_end 20220503
    """

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
    """What to train: table layout and architecture.

    >>> spec = ModelSpec("k=2, 1k rows", HashConfig.uniform(num_buckets=1000))
    >>> spec.transformer.dim, spec.vocab is None
    (32, True)
    """

    name: str
    hash_config: HashConfig
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        dim=32, num_layers=2, num_q_heads=2, num_kv_heads=1, widening_factor=2.0))  # fmt: skip
    vocab: dict | None = None  # set for the collision-free table
    dropout: float = 0.0
    side_features: bool = True  # use the log's side features (when it has any)
    rate_features: bool = False  # add time-respecting smoothed rates (``with_rate_features``)
    user_bias_rows: int = 0  # a per-user logit offset (``RankerConfig.user_bias_rows``)
    user_bias_actions: tuple[str, ...] = ()  # ... for these actions (empty: every action)


def hashed_config(
    log: InteractionLog,
    table_fraction: float,
    num_hashes: int,
    scheme: str = "default",
    weights: dict[str, float] | None = None,
) -> HashConfig:
    """Plain Phoenix multi-hash for ``log`` (``hashrec.data.tables.table_config`` with
    ``multihash``): blocks sized by ``entity_budgets``, a ``feature`` block for categorical
    side values."""
    every_row = np.ones(len(log.user), dtype=bool)
    return table_config(log, every_row, "multihash", table_fraction, num_hashes,
                        hash_scheme=scheme, weights=weights)  # fmt: skip


def collision_free_spec(
    log: InteractionLog, transformer: TransformerConfig | None = None, dropout: float = 0.0
) -> ModelSpec:
    cfg, vocab = collision_free_config(log)
    spec = ModelSpec("full table", cfg, vocab=vocab, dropout=dropout)
    if transformer is not None:
        spec.transformer = transformer
    return spec


def side_config(log: InteractionLog, hash_config: HashConfig) -> SideConfig:
    """The ``SideConfig`` of a log's side features (categorical ones need a feature block)."""
    sd = log.side
    has_block = "feature" in hash_config
    return SideConfig(
        user_fields=sd.user_cat.shape[1] if has_block else 0,
        post_fields=sd.post_cat.shape[1] if has_block else 0,
        user_numeric=sd.user_num.shape[1],
        post_numeric=sd.post_num.shape[1],
        history_signals=sd.signals.shape[1],
    )


def ranker_config(log: InteractionLog, spec: ModelSpec) -> RankerConfig:
    """The ranker for ``log``; refuses a log the model cannot take (e.g. a surface >= 16)
    here, before anything is trained or written."""
    cfg = RankerConfig(
        hash=spec.hash_config,
        transformer=spec.transformer,
        actions=log.actions,
        continuous_actions=log.continuous_actions,
        side=side_config(log, spec.hash_config),
        dropout=spec.dropout,
        user_bias_rows=spec.user_bias_rows,
        user_bias_actions=spec.user_bias_actions,
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
    resume): split, example settings, model name, fingerprint of the training rows, whether
    side and rate features were used (``evaluate`` rebuilds the same inputs) and the side
    numbers' standardisation (``log`` is ``model_log``'s: the training rows' statistics, what
    serving standardises requests with)."""
    train, _ = split.masks(log)
    return {"split": asdict(split), "examples": asdict(examples), "model": spec.name,
            "data": data_fingerprint(log, train), "side_features": spec.side_features,
            "rate_features": spec.rate_features, "side_stats": log.side.stats}  # fmt: skip


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
    mlog = model_log(log, spec, split.masks(log)[0])  # as run_model's
    current = {"model_config": ranker_config(mlog, spec).to_dict(), "train": asdict(train_cfg),
               **run_record(mlog, split, spec, examples)}  # fmt: skip
    check_resumable(checkpoint, saved, current, meta["train_state"], train_cfg.epochs)
    return True


@dataclass
class ModelRun:
    """One trained model and its predictions on the evaluation days (what ``run_model`` returns).

    >>> from hashrec.datasets import kuairand_sample_dir
    >>> from hashrec.data import ExampleConfig, load_kuairand
    >>> from hashrec.training.trainer import TrainConfig
    >>> import tempfile
    >>> log = load_kuairand(kuairand_sample_dir())
    >>> spec = ModelSpec("tiny", hashed_config(log, 0.25, 2),
    ...                  TransformerConfig(dim=8, num_layers=1, num_q_heads=1, num_kv_heads=1))
    >>> r = run_model(log, Split(train_end=20220426, eval_start=20220505), spec,
    ...               ExampleConfig(history_len=4, max_candidates=4),
    ...               TrainConfig(epochs=1, max_steps=2), tempfile.mkdtemp(), progress=False)
    >>> r.predictions.probs.shape[1] == len(log.actions), r.state.global_step
    (True, 2)
    """

    model: PhoenixRanker
    state: TrainState
    predictions: Predictions | None  # None on the ranks > 0 of a multi-process run
    memory: MemoryReport
    train_examples: int


REFIT_DIR = "refit"  # the refit model's folder inside a run's (``TrainConfig.refit``)


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
    """Train ``spec`` on the training days (less the validation part, see ``TrainConfig``),
    predict the evaluation days (rank 0 only).

    With ``train_cfg.refit``, the run in ``run_dir`` chooses the epoch count on the validation
    rows; then a fresh model (same seed) trains that many epochs on every training row, in
    ``run_dir / "refit"`` (``REFIT_DIR``), and is the one returned and evaluated; ``state``
    stays the validated run's (its validation scores and best epoch)."""
    train, ev = split.masks(log)
    log = model_log(log, spec, train)
    set_seed(train_cfg.seed)
    hashes = RowHashes(log, spec.hash_config, spec.vocab)
    fit, val = validation_split(log, train, train_cfg)
    no_neg = ExampleConfig(**{**asdict(examples), "negatives_per_request": 0})
    val_req = build_requests(log, val, no_neg) if val.any() else None
    eval_req = build_requests(log, ev, no_neg)
    record = run_record(log, split, spec, examples)

    def train_on(rows: np.ndarray, cfg: TrainConfig, folder: Path, validate, extra: dict):
        set_seed(cfg.seed)
        requests = build_requests(log, rows, examples, negative_pool=np.flatnonzero(rows),
                                  seed=cfg.seed)  # fmt: skip
        model = PhoenixRanker(ranker_config(log, spec))
        trainer = Trainer(model, cfg, folder, progress=progress, device=device)
        trainer.extra = {**record, **extra}
        if resume:
            trainer.resume()
        state = trainer.fit(log, hashes, requests, validate)
        return model, trainer, state, requests

    model, trainer, state, train_req = train_on(fit, train_cfg, Path(run_dir), val_req, {})
    if train_cfg.refit:
        if state.best_epoch < 0:
            raise ValueError("refit: the validation rows gave no score to choose the epoch "
                             "count (no validation request, or no finished epoch)")  # fmt: skip
        epochs = state.best_epoch + 1
        refit_cfg = replace(train_cfg, epochs=epochs, val_days=0, val_fraction=0.0, refit=False)
        model, trainer, _, train_req = train_on(
            train, refit_cfg, Path(run_dir) / REFIT_DIR, None,
            {"refit": {"epochs": epochs, "validation": state.validation}},
        )  # fmt: skip
    return ModelRun(
        model=model,
        state=state,
        predictions=predict(model, log, hashes, eval_req) if trainer.ctx.is_main else None,
        memory=model.table.memory_report(trainer.table),
        train_examples=int((train_req.candidates >= 0).sum()),
    )


def model_log(log: InteractionLog, spec: ModelSpec, train: np.ndarray) -> InteractionLog:
    """The log as ``spec``'s model sees it: no side columns when its side features are off,
    their numbers standardised by the ``train`` rows' statistics when they are on
    (``SideColumns.fit_stats``), the rate features (from the ``train`` rows) added when those
    are on."""
    record = {"side_features": spec.side_features, "rate_features": spec.rate_features,
              "side_stats": log.side.stats_of(train) if spec.side_features else None}  # fmt: skip
    return checkpoint_log(log, record, train)  # what the run's checkpoint will record


def checkpoint_log(
    log: InteractionLog, extra: dict, train: np.ndarray | None = None
) -> InteractionLog:
    """The log as the model of a checkpoint saw it, from its ``extra`` record: no side columns
    when ``side_features`` was off, numbers standardised by its ``side_stats``, the rate
    features from the ``train`` rows when ``rate_features`` was on (``train`` is then needed).
    ``model_log`` is this with the statistics of a run about to train. ValueError from
    statistics the log's numbers do not match.

    >>> from hashrec.datasets import kuairand_sample_dir
    >>> from hashrec.data import load_kuairand
    >>> log = load_kuairand(kuairand_sample_dir())
    >>> checkpoint_log(log, {"side_features": False}).side.num_fields
    0
    """
    if extra.get("side_features") is False:
        log = replace(log, side=SideColumns.empty(len(log)))
    elif extra.get("side_stats"):
        log = replace(log, side=log.side.with_stats(extra["side_stats"]))
    if extra.get("rate_features"):
        if train is None:
            raise ValueError("the checkpoint's model takes rate features: give the training rows")
        log = with_rate_features(log, train)
    return log


def with_rate_features(log: InteractionLog, train: np.ndarray) -> InteractionLog:
    """``log`` with the logistic baseline's target encodings as numeric side features: smoothed
    per-user rates of every action (user fields) and per-post and per-author rates (post
    fields), as logits standardised by the training rows' statistics; the store
    (``log.side.store``, one is made if the log has none) gets them by ID for serving
    (``rate_tables``).

    Time-respecting like the baseline: a row on training day d is encoded from the training
    rows of days before d, any later row from the training rows only, so no row's own label and
    no evaluation label reaches a feature.
    """
    y = log.labels.astype(np.float64)
    A = y.shape[1]
    user, post = np.zeros((len(log), A)), np.zeros((len(log), 2 * A))
    last = log.day[train].max()
    for d in np.unique(log.day):
        rows = np.flatnonzero(log.day == d)
        hist = train & (log.day < d) if d <= last else train
        prior = y[hist].mean(0) if hist.any() else np.full(A, 0.5)  # day 1: no past

        def rates(entity: str, rows=rows, hist=hist, prior=prior) -> np.ndarray:
            ids = getattr(log, entity)
            return _logit(smoothed_rates(ids[hist], y[hist], ids[rows], prior))

        user[rows] = rates("user")
        post[rows] = np.concatenate([rates("post"), rates("author")], axis=1)

    stats = {"user": _rate_stats(user, train), "post": _rate_stats(post[:, :A], train),
             "author": _rate_stats(post[:, A:], train)}  # fmt: skip
    sd = log.side
    rates = rate_tables(log, train, stats)  # its field names are the served ones
    names = dict(sd.names)
    names["user_num"] = (*names.get("user_num", ()), *rates.names("user"))
    names["post_num"] = (*names.get("post_num", ()), *rates.names("post"), *rates.names("author"))
    store = replace(sd.store or SideStore(), rates=rates)
    side = SideColumns(sd.user_cat, sd.post_cat,
                       np.concatenate([sd.user_num, _standardised(user, stats["user"])], 1),
                       np.concatenate([sd.post_num, _standardised(post[:, :A], stats["post"]),
                                       _standardised(post[:, A:], stats["author"])], 1),
                       sd.signals, names, sd.stats, sd.raw_signals, store, sd.raw)  # fmt: skip
    return replace(log, side=side)


def _rate_stats(x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column (mean, scale) of the rate logits ``x`` over the training rows."""
    return x[train].mean(0), np.maximum(x[train].std(0), 1e-6)


def _standardised(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return ((x - stats[0]) / stats[1]).astype(np.float32)


def rate_tables(
    log: InteractionLog,
    train: np.ndarray,
    stats: dict[str, tuple[np.ndarray, np.ndarray]],
) -> RateTables:
    """Each user's, post's and author's standardised rate logits over every training row (what
    ``with_rate_features`` gives any row after the last training day), by ID, for serving."""
    y = log.labels[train].astype(np.float64)
    prior = y.mean(0)
    tables, unseen = {}, {}
    for entity in ("user", "post", "author"):
        keys = getattr(log, entity)[train]
        ids = np.unique(keys)
        x = _logit(smoothed_rates(keys, y, ids, prior))
        tables[entity] = Keyed(ids, _standardised(x, stats[entity]))
        unseen[entity] = _standardised(_logit(prior[None]), stats[entity])[0]
    return RateTables(tuple(log.actions), tables, unseen)


def validation_split(
    log: InteractionLog, train: np.ndarray, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training rows: the last ``val_fraction`` of them by
    time, else the last ``val_days`` days; none held out when both are 0."""
    if config.val_fraction > 0:
        t = log.time[train]
        cut = np.quantile(t, 1.0 - config.val_fraction)
        val = train & (log.time > cut)
    elif config.val_days > 0:
        days = np.unique(log.day[train])
        if len(days) <= config.val_days:
            raise ValueError(
                f"val_days (--val-days) {config.val_days} leaves no training day: training has "
                f"{len(days)} day(s), hold out at most {len(days) - 1}"
            )
        val = train & (log.day > days[-config.val_days - 1])
    else:
        val = np.zeros_like(train)
    fit = train & ~val
    if val.any() and not fit.any():
        raise ValueError("the validation split leaves no training rows")
    return fit, val


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


def ensemble_probs(probs: Sequence[np.ndarray], eps: float = 1e-7) -> np.ndarray:
    """The ensemble of several models' probabilities on the same rows: the sigmoid of the mean
    of their logits (probabilities clipped to [eps, 1 - eps] first). Each array [n, A].

    Averaging logits and averaging probabilities measured level on KuaiRand (3 seeds, the
    sweep's split: click AUC 0.7353 either way); logits keep a confident model's say.

    >>> ensemble_probs([np.array([[0.9]]), np.array([[0.5]])]).round(3)
    array([[0.75]])
    """
    if not probs:
        raise ValueError("ensemble_probs needs at least one array of probabilities")
    shapes = {p.shape for p in probs}
    if len(shapes) != 1:
        raise ValueError(f"probabilities of different shapes: {sorted(shapes)}")
    p = np.clip(np.stack([np.asarray(x, dtype=np.float64) for x in probs]), eps, 1.0 - eps)
    z = np.log(p) - np.log1p(-p)
    return 1.0 / (1.0 + np.exp(-z.mean(0)))


def baseline_predictions(
    log: InteractionLog, split: Split, rows: np.ndarray, gbdt: bool | None = None
) -> dict[str, np.ndarray]:
    """Popularity, logistic regression and (``gbdt``; default: when LightGBM is installed)
    LightGBM, fitted on the training days, predicting ``rows``."""
    train, _ = split.masks(log)
    preds = {"popularity": popularity(log, train, rows)}
    if len(np.unique(log.day[train])) >= 2:
        preds["logistic regression"] = LogisticBaseline().fit(log, train).predict(log, train, rows)
        if gbdt_available() if gbdt is None else gbdt:
            preds["LightGBM"] = GBDTBaseline().fit(log, train).predict(log, train, rows)
    return preds


@dataclass
class ExperimentResult:
    """What ``run`` measured: metrics per model and baseline, and facts about the run.

    >>> res = ExperimentResult(results={"popularity": {"auc": {"click": 0.64}}}, models={},
    ...                        table="| model | AUC click |", eval_impressions=10, eval_users=3,
    ...                        wall_s=1.0)
    >>> res.results["popularity"]["auc"]["click"]
    0.64
    """

    results: dict[str, dict]  # name -> {"auc": {action: mean}, "auc_std": ..., "seeds": n, ...}
    models: dict[str, dict]  # trained model name -> throughput and table size
    table: str  # the Markdown results table
    eval_impressions: int
    eval_users: int
    wall_s: float
    seeds: tuple[int, ...] = (0,)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _with_ensembles(
    log: InteractionLog,
    rows: np.ndarray,
    reqs: np.ndarray,
    runs: dict[str, list[dict]],
    probs: dict[str, list[np.ndarray]],
) -> dict[str, list[dict]]:
    """``runs`` with each model of several seeds followed by its ensemble's metrics."""
    out: dict[str, list[dict]] = {}
    for name, ms in runs.items():
        out[name] = ms
        if len(probs[name]) > 1:
            ens = f"{name}, ensemble of {len(probs[name])} seeds"
            out[ens] = [
                evaluate_predictions(log, rows, reqs, {ens: ensemble_probs(probs[name])})[ens]
            ]
    return out


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
    seeds: tuple[int, ...] | None = None,
) -> ExperimentResult | None:
    """Train ``spec`` (then each of ``also``, then the collision-free table) once per seed,
    score the baselines, evaluate all of them on the same impressions; write ``metrics.json``,
    ``results.md`` and ``results.png`` to ``out``. Figures are the mean over ``seeds`` (default:
    the training seed alone) with their std; with several seeds each model also gets a row
    ``"<name>, ensemble of <n> seeds"``: its seeds' predictions combined (``ensemble_probs``).
    The first seed's checkpoint lands in ``out``, the others' in ``out/seed_<s>`` (with
    ``train_cfg.refit``, the refit model in ``refit/`` there).

    Under torchrun every rank trains; rank 0 alone evaluates, writes and reports (the others
    return None once trained).
    """
    from hashrec.evaluation.report import aggregate_seeds, format_results, plot_run

    main_rank = env_world()[0] == 0
    if not main_rank:
        say, progress = (lambda _: None), False
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds) if seeds else (train_cfg.seed,)
    full = collision_free_spec(log, spec.transformer, spec.dropout)
    full.side_features = spec.side_features
    full.rate_features = spec.rate_features
    full.user_bias_rows, full.user_bias_actions = spec.user_bias_rows, spec.user_bias_actions
    specs = [spec, *also] + ([full] if with_full_table else [])
    runs: dict[str, list[dict]] = {}
    probs: dict[str, list[np.ndarray]] = {}  # each seed's predictions, for the ensembles
    losses, info = {}, {}
    rows = reqs = None
    full_rows = collision_free_config(log)[0].num_rows
    for i, seed in enumerate(seeds):
        cfg = replace(train_cfg, seed=seed)
        for sp in specs:
            say(f"training {sp.name}, seed {seed} ({i + 1}/{len(seeds)}) ...")
            sub = out if sp is spec else out / ("full_table" if sp is full else _slug(sp.name))
            sub = sub if i == 0 else sub / f"seed_{seed}"
            r = run_model(log, split, sp, examples, cfg, sub, resume=resume and sp is spec,
                          progress=progress, device=device)  # fmt: skip
            if r.predictions is None:  # a rank > 0: rank 0 evaluates
                continue
            if rows is not None and not np.array_equal(rows, r.predictions.rows):
                raise RuntimeError("models were evaluated on different rows")
            rows, reqs = r.predictions.rows, r.predictions.requests
            m = evaluate_predictions(log, rows, reqs, {sp.name: r.predictions.probs})[sp.name]
            runs.setdefault(sp.name, []).append(m)
            probs.setdefault(sp.name, []).append(r.predictions.probs)
            if i == 0:
                losses[sp.name] = r.state.losses
                info[sp.name] = {"examples_per_s": r.state.examples_per_s,
                                 "train_examples": r.train_examples,
                                 "table_bytes": r.memory.table_bytes,
                                 "table_rows": r.memory.rows,
                                 "table_share_of_full": r.memory.rows / full_rows,
                                 "user_bias_bytes": (r.model.user_bias.num_bytes
                                                     if r.model.user_bias else 0),
                                 "best_epochs": []}  # fmt: skip
            info[sp.name]["best_epochs"].append(r.state.best_epoch)
    if not main_rank:
        return None
    assert rows is not None and reqs is not None
    runs = _with_ensembles(log, rows, reqs, runs, probs)
    say("scoring baselines ...")
    base = evaluate_predictions(log, rows, reqs, baseline_predictions(log, split, rows))
    results = aggregate_seeds({**{k: [v] for k, v in base.items()}, **runs})
    positives = dict(zip(log.actions, log.labels[rows].sum(0).tolist(), strict=True))
    res = ExperimentResult(
        results=results,
        models=info,
        table=format_results(results, log.actions, positives),
        eval_impressions=len(rows),
        eval_users=len(np.unique(log.user[rows])),
        wall_s=time.perf_counter() - t0,
        seeds=seeds,
    )
    write_json_atomic(out / "metrics.json", {"results": results, "models": info,
                      "per_seed": runs, "seeds": list(seeds), "positives": positives,
                      "eval_impressions": res.eval_impressions, "wall_s": res.wall_s})  # fmt: skip
    write_text_atomic(out / "results.md", res.table + "\n")
    plot_run(results, losses, log.actions, out / "results.png", positives)
    return res
