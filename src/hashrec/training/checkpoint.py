"""Checkpoints: one safetensors file holding weights, optimizer state and JSON metadata.

This is the one place that writes and reads model files. Loading it imports neither the trainer
nor tqdm, so a server or a notebook can load a model cheaply. The file is written through
``hashrec.files.write_atomic`` (temporary file, fsync, rename): a crash or a kill mid-save leaves
the previous checkpoint intact. Only safetensors is read: nothing is ever unpickled.

Layout: tensors ``model.<name>`` (the model's state dict), ``optim.<optimizer>.<param>.<key>``
(optimizer state), ``rng.<device>`` (the torch random state of a training run, so a resumed
run draws the same dropout masks), ``checkpoint.digest`` (SHA-256 of the metadata below, so
an edited config is refused rather than silently changing results); metadata ``format``,
``model_class``, ``model_config``, ``optimizer_groups``, ``train_state``, ``extra`` (JSON
strings).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hashrec.files import write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOSS_HISTORY_LIMIT",
    "CheckpointInfo",
    "TrainState",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "hashrec-checkpoint-2"
LOSS_HISTORY_LIMIT = 20_000  # steps of loss history kept in a checkpoint (the most recent)
_META_KEYS = ("format", "model_class", "model_config", "optimizer_groups", "train_state", "extra")
_DIGEST = "checkpoint.digest"


@dataclass
class TrainState:
    """Where a run stands; ``losses`` keeps the most recent ``LOSS_HISTORY_LIMIT`` steps.

    >>> state = TrainState()
    >>> state.record_loss(0.7)
    >>> state.losses, state.done
    ([0.7], False)
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    examples_per_s: float = 0.0
    done: bool = False
    validation: list[float] = field(default_factory=list)  # score after each epoch
    best_epoch: int = -1  # epoch (0-based) of the best validation score; -1: none yet

    def record_loss(self, loss: float) -> None:
        self.losses.append(loss)
        if len(self.losses) > LOSS_HISTORY_LIMIT:
            del self.losses[: len(self.losses) - LOSS_HISTORY_LIMIT]


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything in a checkpoint besides the model: optimizer states, position, run metadata.

    >>> info = CheckpointInfo(optimizers={}, train_state=TrainState(epoch=1), extra={},
    ...                       model_class="PhoenixRanker")
    >>> info.train_state.epoch, info.model_class
    (1, 'PhoenixRanker')
    """

    optimizers: dict[str, dict[str, Any]]  # name -> torch optimizer state_dict
    train_state: TrainState | None
    extra: dict[str, Any]
    model_class: str
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # device -> torch random state


def _model_classes() -> dict[str, tuple[type, Any]]:
    """Model class name -> (class, config parser). Imported here, not at module import."""
    from hashrec.models.phoenix_retrieval import PhoenixRetrieval
    from hashrec.models.ranker import PhoenixRanker, RankerConfig

    classes: dict[str, tuple[type, Any]] = {
        "PhoenixRanker": (PhoenixRanker, RankerConfig),
        "PhoenixRetrieval": (PhoenixRetrieval, RankerConfig),
    }
    try:
        from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever
    except ImportError:
        pass
    else:
        classes["TwoTowerRetriever"] = (TwoTowerRetriever, TwoTowerConfig)
    return classes


def _digest(meta: dict[str, str]) -> torch.Tensor:
    h = hashlib.sha256()
    for k in _META_KEYS:
        h.update(k.encode() + b"\0" + meta[k].encode() + b"\0")
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def _optim_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {
        f"{prefix}.{idx}.{key}": value.detach().contiguous().cpu().clone()
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
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    state: TrainState | None = None,
    extra: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights (+ optimizer state, training position, run metadata, random state) into one
    file, atomically.

    ``model`` is a registered model class with a ``config`` that has ``to_dict()``; ``rng``
    maps a device type to its torch random state (``torch.get_rng_state()``).
    """
    name = type(model).__name__
    if name not in _model_classes():
        raise ValueError(f"cannot checkpoint a {name}: expected one of {sorted(_model_classes())}")
    tensors = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        # written synchronously, so no snapshot copy: a 1.5 GB table is not held twice. Only a
        # tensor sharing storage with an earlier one (a tied weight) is copied: safetensors
        # refuses shared storage.
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        tensors[f"model.{k}"] = t.clone() if ptr in seen else t
        seen.add(ptr)
    groups = {}
    for opt_name, opt in (optimizers or {}).items():
        t, g = _optim_tensors(f"optim.{opt_name}", opt)
        tensors.update(t)
        groups[opt_name] = g
    for device, t in (rng or {}).items():
        tensors[f"rng.{device}"] = t.detach().cpu().clone()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model_class": name,
        "model_config": json.dumps(model.config.to_dict()),
        "optimizer_groups": json.dumps(groups),
        "train_state": json.dumps(asdict(state) if state else None),
        "extra": json.dumps(extra or {}),
    }
    tensors[_DIGEST] = _digest(meta)
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, JSON fields decoded, without reading the weights."""
    path = Path(path)
    meta = _read_meta(path)
    plain = ("format", "model_class")
    return {k: (v if k in plain else json.loads(v)) for k, v in meta.items()}


def _read_meta(path: Path) -> dict[str, str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a checkpoint file (.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: checkpoint metadata lacks {missing}")
    return meta


# safetensors dtype names -> torch
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_CHUNK_BYTES = 1 << 24  # read at most 16 MB at a time


def _read_header(fh, path: Path) -> tuple[dict, int]:
    """The safetensors header (tensor name -> dtype, shape, byte range) and where data starts."""
    raw = fh.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < n < 1 << 28:
        raise ValueError(f"{path}: not a readable checkpoint (bad header)")
    try:
        header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_into(fh, base: int, info: dict, target: torch.Tensor, what: str) -> None:
    """Read one stored tensor straight into ``target`` (CPU, same shape), a chunk of rows at a
    time: a 1.5 GB embedding table is never held twice. Floats must be finite."""
    dtype = _DTYPES.get(info.get("dtype"))
    shape = list(info.get("shape", []))
    a, b = info.get("data_offsets", (0, -1))
    if dtype is None or shape != list(target.shape):
        raise ValueError(
            f"{what}: stored as {info.get('dtype')} {shape}, expected {list(target.shape)}"
        )
    numel = target.numel()
    itemsize = torch.empty((), dtype=dtype).element_size()
    if b - a != numel * itemsize:
        raise ValueError(f"{what}: {b - a} bytes stored, expected {numel * itemsize}")
    if numel == 0:
        return
    rows = shape[0] if shape else 1
    row_bytes = (b - a) // rows
    flat = target.view(rows, -1)
    step = max(1, _CHUNK_BYTES // row_bytes)
    fh.seek(base + a)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        buf = bytearray(n * row_bytes)
        if fh.readinto(buf) != len(buf):
            raise ValueError(f"{what}: the file is truncated")
        chunk = torch.frombuffer(buf, dtype=dtype).view(n, -1)
        if chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"{what} holds NaN or infinite values")
        with torch.no_grad():
            flat[r : r + n].copy_(chunk)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, CheckpointInfo]:
    """Rebuild the model from the checkpoint's own config and load its weights.

    Refuses a file that is not a hashrec safetensors checkpoint, one whose metadata was edited
    (digest mismatch), whose config does not fit its weights, or whose weights are not finite.
    """
    path = Path(path)
    meta = _read_meta(path)
    with open(path, "rb") as fh:
        header, base = _read_header(fh, path)
        tensors = {}  # everything but the model's weights (digest, optimizer state): small
        for name, info in header.items():
            if not name.startswith("model."):
                t = torch.empty(info.get("shape", []), dtype=_DTYPES.get(info.get("dtype")))
                _read_into(fh, base, info, t, f"{path}: {name}")
                tensors[name] = t
    stored = tensors.pop(_DIGEST, None)
    if stored is None or not torch.equal(stored, _digest(meta)):
        raise ValueError(
            f"{path}: the metadata does not match the digest stored with the weights "
            "(edited or corrupt checkpoint)"
        )
    classes = _model_classes()
    if meta["model_class"] not in classes:
        raise ValueError(
            f"{path}: model_class {meta['model_class']!r}, expected one of {sorted(classes)}"
        )
    cls, config_cls = classes[meta["model_class"]]
    try:
        config = config_cls.from_dict(json.loads(meta["model_config"]))
        model = cls(config)
    except (TypeError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: bad model_config ({e})") from e
    # the weights stream straight into the freshly built model (on CPU), chunk by chunk
    state = model.state_dict()
    stored_names = {k[len("model.") :] for k in header if k.startswith("model.")}
    missing, unexpected = sorted(set(state) - stored_names), sorted(stored_names - set(state))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not fit the stored config (missing {missing}, "
            f"unexpected {unexpected})"
        )
    with open(path, "rb") as fh:
        for k, target in state.items():
            try:
                _read_into(fh, base, header[f"model.{k}"], target, f"{path}: weight {k}")
            except ValueError as e:
                if "NaN" in str(e) or "truncated" in str(e):
                    raise
                raise ValueError(f"{e} (the weights do not fit the stored config)") from e
    model.to(map_location)
    rng = {k[len("rng.") :]: tensors.pop(k) for k in list(tensors) if k.startswith("rng.")}
    tensors = {k: v.to(map_location) for k, v in tensors.items()}  # random states stay on CPU
    groups = json.loads(meta["optimizer_groups"])
    raw_state = json.loads(meta["train_state"])
    info = CheckpointInfo(
        optimizers={n: _optim_state(f"optim.{n}", tensors, g) for n, g in groups.items()},
        train_state=TrainState(**raw_state) if raw_state is not None else None,
        extra=json.loads(meta["extra"]),
        model_class=meta["model_class"],
        rng=rng,
    )
    model.eval()  # loaded for inference: dropout off (a Trainer switches to train mode itself)
    return model, info
