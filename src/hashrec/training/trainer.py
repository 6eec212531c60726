"""Training loop, checkpoints and prediction for ``PhoenixRanker``.

AdamW trains the dense weights, ``RowWiseAdagrad`` the hash table (as X does). Batches come in a
per-epoch permutation seeded by (seed, epoch), so a run resumed from a checkpoint continues with
exactly the batches it would have seen. Checkpoints are one safetensors file (weights, optimizer
state) whose metadata holds the JSON config and the training state: written to a temporary file
and renamed, so a crash mid-save leaves the previous checkpoint intact. Rank-aware: under
``torchrun`` each rank takes every world_size-th batch and only rank 0 logs and saves.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hashrec.data.log import InteractionLog, Requests, RowHashes, batches
from hashrec.models.losses import ranking_loss
from hashrec.models.ranker import PhoenixRanker, RankerConfig
from hashrec.nn.table import RowWiseAdagrad

__all__ = [
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "predict",
    "save_checkpoint",
    "set_seed",
]

CHECKPOINT_FORMAT = "hashrec-checkpoint-1"


@dataclass
class TrainConfig:
    """Optimisation settings (architecture lives in ``RankerConfig``)."""

    epochs: int = 2
    batch_size: int = 128  # requests per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    table_lr: float = 0.05
    continuous_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500  # steps; a checkpoint is also written after every epoch
    max_steps: int | None = None  # stop early (the run can be resumed)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"need epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )
        if self.lr <= 0 or self.table_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got {self.lr}, {self.table_lr}")


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    examples_per_s: float = 0.0
    done: bool = False


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # numpy randomness always goes through seeded Generators


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _optim_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {
        f"{prefix}.{idx}.{key}": value.detach().contiguous().clone()
        for idx, st in sd["state"].items()
        for key, value in st.items()
        if torch.is_tensor(value)
    }
    return tensors, sd["param_groups"]


def _optim_state(prefix: str, tensors: dict, groups: list) -> dict:
    state: dict = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | Path,
    model: PhoenixRanker,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    state: TrainState | None = None,
    extra: dict | None = None,
) -> None:
    """Weights (+ optimizer state) into one safetensors file, atomically."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    groups = {}
    for name, opt in (optimizers or {}).items():
        t, g = _optim_tensors(f"optim.{name}", opt)
        tensors.update(t)
        groups[name] = g
    meta = {
        "format": CHECKPOINT_FORMAT,
        "ranker_config": json.dumps(model.config.to_dict()),
        "optimizer_groups": json.dumps(groups),
        "train_state": json.dumps(asdict(state) if state else None),
        "extra": json.dumps(extra or {}),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> tuple[PhoenixRanker, dict]:
    """Model rebuilt from the checkpoint's own config; info has optimizer state, train state."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    config = RankerConfig.from_dict(json.loads(meta["ranker_config"]))
    model = PhoenixRanker(config)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    groups = json.loads(meta["optimizer_groups"])
    info = {
        "optimizers": {n: _optim_state(f"optim.{n}", tensors, g) for n, g in groups.items()},
        "train_state": json.loads(meta["train_state"]),
        "extra": json.loads(meta["extra"]),
    }
    return model, info


class Trainer:
    """Trains a ranker on requests; checkpoints to ``run_dir / checkpoint.safetensors``."""

    def __init__(
        self, model: PhoenixRanker, config: TrainConfig, run_dir: str | Path, progress: bool = True
    ) -> None:
        self.model, self.config = model, config
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = _rank()
        self.progress = progress and self.rank == 0
        self.dense = torch.optim.AdamW(
            model.dense_parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.table = RowWiseAdagrad(model.table.parameters(), lr=config.table_lr)
        self.state = TrainState()
        self.extra: dict = {}

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    def save(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            optimizers = {"dense": self.dense, "table": self.table}
            save_checkpoint(self.checkpoint_path, self.model, optimizers, self.state, self.extra)

    def resume(self) -> bool:
        """Load model, optimizers and position from the run's checkpoint; False if none."""
        if not self.checkpoint_path.exists():
            return False
        model, info = load_checkpoint(self.checkpoint_path)
        if model.config != self.model.config:
            raise ValueError(f"{self.checkpoint_path}: its model config differs from this run's")
        self.model.load_state_dict(model.state_dict())
        self.dense.load_state_dict(info["optimizers"]["dense"])
        self.table.load_state_dict(info["optimizers"]["table"])
        self.state = TrainState(**info["train_state"])
        self.extra = info["extra"]
        return True

    def fit(self, log: InteractionLog, hashes: RowHashes, requests: Requests) -> TrainState:
        c, st = self.config, self.state
        n_steps = math.ceil(len(requests) / c.batch_size)
        self.model.train()
        seen, t0 = 0, time.perf_counter()
        for epoch in range(st.epoch, c.epochs):
            perm = np.random.default_rng([c.seed, epoch]).permutation(len(requests))
            start = st.step_in_epoch
            bar = tqdm(total=n_steps, initial=start, desc=f"epoch {epoch + 1}/{c.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)  # fmt: skip
            stream = batches(log, hashes, requests, c.batch_size, perm[start * c.batch_size :])
            for i, (batch, labels, label_mask, cont, _) in enumerate(stream):
                if (start + i) % self.world_size != self.rank:
                    continue
                out = self.model(batch)
                loss = ranking_loss(out, labels, label_mask, cont, c.continuous_weight)
                loss.backward()
                self.dense.step()
                self.table.step()
                self.dense.zero_grad(set_to_none=True)
                self.table.zero_grad(set_to_none=True)
                seen += int(out.candidate_mask.sum())
                st.losses.append(loss.item())
                st.global_step += 1
                st.step_in_epoch = start + i + 1
                st.examples_per_s = seen / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{np.mean(st.losses[-20:]):.4f}", ex_s=f"{st.examples_per_s:,.0f}"
                )
                if st.global_step % c.checkpoint_every == 0:
                    self.save()
                if c.max_steps is not None and st.global_step >= c.max_steps:
                    bar.close()
                    self.save()
                    return st
            bar.close()
            st.epoch, st.step_in_epoch = epoch + 1, 0
            st.done = st.epoch == c.epochs  # the last epoch's checkpoint marks the run done
            self.save()
        return st


@torch.no_grad()
def predict(
    model: PhoenixRanker,
    log: InteractionLog,
    hashes: RowHashes,
    requests: Requests,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities of every real candidate: (log rows [n], request index [n], probs [n, A])."""
    model.eval()
    rows, reqs, probs = [], [], []
    offset = 0
    for batch, _, _, _, cand_rows in batches(log, hashes, requests, batch_size):
        p = model(batch).probs.numpy()
        keep = cand_rows >= 0
        rows.append(cand_rows[keep])
        reqs.append(
            (np.arange(len(cand_rows))[:, None] + offset).repeat(cand_rows.shape[1], 1)[keep]
        )
        probs.append(p[keep])
        offset += len(cand_rows)
    return np.concatenate(rows), np.concatenate(reqs), np.concatenate(probs)
