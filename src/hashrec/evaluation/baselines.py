"""Baselines computed on the same split as the ranker, from training rows only.

* ``popularity``: the post's smoothed positive rate per action over the training rows.
* ``LogisticBaseline``: the classic CTR model. Features: smoothed user / post / author rates of
  the action (as logits), the surface (one-hot) and log duration. Target encodings follow time:
  a training row on day d is encoded from days before d only; evaluation rows from the training
  days only, so no evaluation label ever reaches a feature.
* ``GBDTBaseline``: LightGBM (the optional ``gbdt`` extra) on the same time-respecting features,
  the model most teams would otherwise pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hashrec.data import InteractionLog, sorted_lookup

__all__ = ["GBDTBaseline", "LogisticBaseline", "gbdt_available", "popularity", "smoothed_rates"]

_PRIOR_WEIGHT = 20.0


def smoothed_rates(
    keys: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
    prior: np.ndarray,
    m: float = _PRIOR_WEIGHT,
) -> np.ndarray:
    """(positives + m * prior) / (count + m) of each query key over (keys, labels [n, A])."""
    uniq, inv = np.unique(keys, return_inverse=True)
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    pos = np.stack(
        [
            np.bincount(inv, weights=labels[:, a], minlength=len(uniq))
            for a in range(labels.shape[1])
        ],
        axis=1,
    )
    at, found = sorted_lookup(uniq, query)
    c = np.zeros(len(query))
    p = np.zeros((len(query), labels.shape[1]))
    c[found], p[found] = counts[at[found]], pos[at[found]]  # unseen keys: count 0 -> the prior
    return (p + m * prior) / (c[:, None] + m)


def popularity(log: InteractionLog, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Smoothed per-post positive rates from the training rows, for log rows ``rows``: [n, A]."""
    prior = log.labels[train].mean(0)
    return smoothed_rates(log.post[train], log.labels[train], log.post[rows], prior)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-5, 1 - 1e-5)
    return np.log(p / (1 - p))


@dataclass
class LogisticBaseline:
    """One logistic regression per action on time-respecting target encodings.

    >>> from hashrec.data import InteractionLog
    >>> rng = np.random.default_rng(0)
    >>> n = 200
    >>> log = InteractionLog(user=rng.integers(1, 20, n), post=rng.integers(1, 30, n),
    ...     author=rng.integers(1, 5, n), surface=np.zeros(n, dtype=np.int64),
    ...     time=np.arange(n) * 1000, day=np.repeat([20220425, 20220426, 20220427, 20220428], 50),
    ...     labels=rng.integers(0, 2, (n, 1)).astype(np.uint8),
    ...     continuous=np.zeros((n, 0), dtype=np.float32), actions=("click",))
    >>> train = log.day <= 20220427
    >>> p = LogisticBaseline().fit(log, train).predict(log, train, np.flatnonzero(~train))
    >>> p.shape, bool(((p > 0) & (p < 1)).all())
    ((50, 1), True)
    """

    num_surfaces: int = 16
    l2: float = 1e-4
    weights: list[torch.Tensor] | None = None

    def features(
        self, log: InteractionLog, history: np.ndarray, rows: np.ndarray, action: int
    ) -> np.ndarray:
        """Features of ``rows`` encoded from the rows in ``history`` (a bool mask)."""
        y = log.labels[history][:, action : action + 1].astype(np.float64)
        prior = y.mean(0) if len(y) else np.array([0.5])
        cols = [
            _logit(smoothed_rates(getattr(log, e)[history], y, getattr(log, e)[rows], prior))
            for e in ("user", "post", "author")
        ]
        surf = np.eye(self.num_surfaces)[np.clip(log.surface[rows], 0, self.num_surfaces - 1)]
        dur = log.extra.get("duration_ms")
        extra = [np.log1p(np.maximum(dur[rows], 0) / 1000.0)[:, None]] if dur is not None else []
        return np.concatenate([*cols, surf, *extra], axis=1)

    def _train_features(self, log: InteractionLog, train: np.ndarray, action: int):
        """Each training day encoded from the days before it (expanding window)."""
        X, Y = [], []
        days = np.unique(log.day[train])
        for d in days[1:]:  # the first day has no past to encode from
            rows = np.flatnonzero(train & (log.day == d))
            X.append(self.features(log, train & (log.day < d), rows, action))
            Y.append(log.labels[rows, action])
        return np.concatenate(X), np.concatenate(Y)

    def fit(self, log: InteractionLog, train: np.ndarray) -> LogisticBaseline:
        if len(np.unique(log.day[train])) < 2:
            raise ValueError("the logistic baseline needs at least two training days")
        self.weights = []
        for a in range(len(log.actions)):
            X, y = self._train_features(log, train, a)
            self.weights.append(_fit_logistic(X, y, self.l2))
        return self

    def predict(self, log: InteractionLog, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Probabilities [n, A] for ``rows``, encoded from the training rows only."""
        if self.weights is None:
            raise RuntimeError("call fit() first")
        out = []
        for a, w in enumerate(self.weights):
            X = torch.from_numpy(self.features(log, train, rows, a))
            out.append(torch.sigmoid(_design(X) @ w).numpy())
        return np.stack(out, axis=1)


def _design(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)


def _fit_logistic(X: np.ndarray, y: np.ndarray, l2: float) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS (float64; features standardised)."""
    Xt = torch.from_numpy(X)
    mu, sd = Xt.mean(0), Xt.std(0).clamp(min=1e-6)
    Z = _design((Xt - mu) / sd)
    yt = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w, yt)
        loss = loss + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # fold the standardisation into the weights: predictions take raw features
    wd = w.detach()
    coef = wd[:-1] / sd
    return torch.cat([coef, (wd[-1] - (coef * mu).sum()).reshape(1)])


def gbdt_available() -> bool:
    """Whether LightGBM (the ``gbdt`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("lightgbm") is not None


@dataclass
class GBDTBaseline:
    """One LightGBM classifier per action on ``LogisticBaseline``'s time-respecting features.

    Same features, same expanding-window encoding of the training days, so the two baselines
    differ only in the model. Needs the ``gbdt`` extra (``pip install hashrec[gbdt]``).

    >>> from hashrec.data import load_kuairand
    >>> from hashrec.datasets import kuairand_sample_dir
    >>> log = load_kuairand(kuairand_sample_dir())  # doctest: +ELLIPSIS
    ...
    >>> train = log.days(20220425, 20220427)
    >>> rows = np.flatnonzero(log.days(20220428, 20220428))[:5]
    >>> gbdt = GBDTBaseline(num_trees=5).fit(log, train)
    >>> gbdt.predict(log, train, rows).shape == (5, len(log.actions))
    True
    """

    num_trees: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 100
    seed: int = 0
    num_threads: int = 1
    models: list | None = None

    def _features(self) -> LogisticBaseline:
        return LogisticBaseline()

    def fit(self, log: InteractionLog, train: np.ndarray) -> GBDTBaseline:
        try:
            import lightgbm as lgb
        except ImportError as e:
            raise ImportError("GBDTBaseline needs LightGBM: pip install 'hashrec[gbdt]'") from e
        if len(np.unique(log.day[train])) < 2:
            raise ValueError("the GBDT baseline needs at least two training days")
        feats = self._features()
        self.models = []
        for a in range(len(log.actions)):
            X, y = feats._train_features(log, train, a)
            if y.min() == y.max():  # one class only: predict its rate
                self.models.append(float(y.mean()))
                continue
            params = {
                "objective": "binary", "learning_rate": self.learning_rate,
                "num_leaves": self.num_leaves, "min_data_in_leaf": self.min_child_samples,
                "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8,
                "seed": self.seed, "num_threads": self.num_threads, "verbose": -1,
                "deterministic": True,
            }  # fmt: skip
            self.models.append(lgb.train(params, lgb.Dataset(X, y), self.num_trees))
        return self

    def predict(self, log: InteractionLog, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Probabilities [n, A] for ``rows``, encoded from the training rows only."""
        if self.models is None:
            raise RuntimeError("call fit() first")
        feats = self._features()
        out = []
        for a, model in enumerate(self.models):
            if isinstance(model, float):
                out.append(np.full(len(rows), model))
            else:
                out.append(model.predict(feats.features(log, train, rows, a)))
        return np.stack(out, axis=1)
