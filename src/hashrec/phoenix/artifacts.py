"""Reading X's exported Phoenix artifacts into hashrec modules.

An artifact folder (``ranker/`` or ``retrieval/`` of ``oss-phoenix-artifacts.zip``) holds
``config.json``, ``model_params.npz`` (flat ``module/param`` keys, Haiku layout ``[in, out]``) and
``embedding_tables.npz`` (``user_embeddings``, ``item_embeddings``, ``author_embeddings``, each
``[vocab, D]``). X's ``run_pipeline.py`` stacks the three tables under 65 zero rows into one
table; hashrec's ``HashConfig`` (64 reserved rows) has the same layout, so each table is streamed
straight into its block of the fused table: the 1.4 GB of tables are held once, never twice.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hashrec.hashing.config import EntityHash, HashConfig
from hashrec.models.ranker import RankerConfig

__all__ = [
    "CONFIG_FILE",
    "PARAM_FILE",
    "TABLE_FILE",
    "TABLE_KEYS",
    "load_params",
    "param_map",
    "read_config",
    "stream_tables",
]

CONFIG_FILE, PARAM_FILE, TABLE_FILE = "config.json", "model_params.npz", "embedding_tables.npz"
# npz key -> hashrec entity; X's "item" is hashrec's "post"
TABLE_KEYS = {"user_embeddings": "user", "item_embeddings": "post", "author_embeddings": "author"}
_CONFIG_REQUIRED = (
    "emb_size",
    "history_seq_len",
    "candidate_seq_len",
    "num_user_hashes",
    "num_item_hashes",
    "num_author_hashes",
    "key_size",
    "num_heads",
    "num_layers",
    "user_vocab_size",
    "item_vocab_size",
    "author_vocab_size",
    "hash_params",
)
_ROWS_PER_CHUNK = 1 << 14


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an X Phoenix artifact folder has {path.name})")
    return path


def read_config(folder: str | Path) -> tuple[dict, RankerConfig]:
    """``config.json`` -> (the raw dict, the Phoenix-exact ``RankerConfig``).

    X's ``run_pipeline.py`` fixes what the file does not say: widening factor 2, attention
    multiplier 0.125, as many key/value heads as query heads, 19 actions, 16 surfaces, post-age
    buckets of 60 minutes. Optional keys ``num_kv_heads``, ``widening_factor``,
    ``attn_output_multiplier`` override them when present.
    """
    path = _need(Path(folder) / CONFIG_FILE)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _CONFIG_REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if cfg.get("right_anchored_rope"):
        raise ValueError(f"{path}: right_anchored_rope is not supported by hashrec yet")
    hp = cfg["hash_params"]
    ents = []
    for name, x_name in (("user", "user"), ("post", "item"), ("author", "author")):
        keys = (f"{x_name}_hash_scales", f"{x_name}_biases", f"{x_name}_modulus")
        absent = [k for k in keys if k not in hp]
        if absent:
            raise ValueError(f"{path}: hash_params is missing {absent}")
        ents.append(
            EntityHash(
                name,
                num_hashes=int(cfg[f"num_{x_name}_hashes"]),
                num_buckets=int(cfg[f"{x_name}_vocab_size"]),
                scheme="phoenix",
                scales=tuple(int(v) for v in hp[keys[0]]),
                biases=tuple(int(v) for v in hp[keys[1]]),
                modulus=int(hp[keys[2]]),
            )
        )
    rc = RankerConfig.phoenix_mini(
        dim=int(cfg["emb_size"]),
        num_layers=int(cfg["num_layers"]),
        num_heads=int(cfg["num_heads"]),
        num_kv_heads=int(cfg.get("num_kv_heads", cfg["num_heads"])),
        head_dim=int(cfg["key_size"]),
        post_age_granularity_mins=int(cfg.get("post_age_granularity_mins", 60)),
        num_surfaces=int(cfg.get("product_surface_vocab_size", 16)),
    )
    num_actions = int(cfg.get("num_actions", 19))
    if num_actions != rc.num_actions:
        raise ValueError(f"{path}: num_actions is {num_actions}, Phoenix's heads are 19")
    tf = replace(
        rc.transformer,
        widening_factor=float(cfg.get("widening_factor", 2.0)),
        attn_scale=float(cfg.get("attn_output_multiplier", 0.125)),
    )
    return cfg, replace(rc, hash=HashConfig(entities=tuple(ents)), transformer=tf)


def param_map(kind: str, num_layers: int) -> dict[str, tuple[str, bool]]:
    """X's npz key -> (hashrec parameter name, transpose?) for ``kind`` ranker or retrieval."""
    if kind == "ranker":
        top = "phoenix_model/"
        m = {
            top + "proj_mat_1": ("user_reduce.proj_mat_1", False),
            top + "proj_mat_3": ("history_reduce.proj_mat_3", False),
            top + "proj_mat_2": ("candidate_reduce.proj_mat_2", False),
            top + "history_dwell_time_proj1": ("history_dwell_time_proj1", False),
            top + "history_dwell_time_proj2": ("history_dwell_time_proj2", False),
            top + "post_age_embedding_table": ("post_age_embedding_table.weight", False),
            top + "unembeddings": ("unembeddings", False),
            top + "continuous_unembeddings": ("continuous_unembeddings", False),
            top + "rms_norm/scale": ("transformer.final_norm.scale", False),
        }
    elif kind == "retrieval":
        top = "phoenix_retrieval_model/"
        tower = top + "~build_candidate_representation/candidate_tower/"
        m = {
            top + "proj_mat_1": ("user_reduce.proj_mat_1", False),
            top + "proj_mat_3": ("history_reduce.proj_mat_3", False),
            tower + "candidate_tower_projection_1": ("candidate_tower_projection_1", False),
            tower + "candidate_tower_projection_2": ("candidate_tower_projection_2", False),
        }
    else:
        raise ValueError(f"kind must be 'ranker' or 'retrieval', got {kind!r}")
    m[top + "product_surface_embedding_table"] = (
        "history_reduce.product_surface_embedding_table.weight",
        False,
    )
    m[top + "action_projection"] = ("history_reduce.actions.action_projection", False)
    for i in range(num_layers):
        x, h = f"transformer/decoder_layer_{i}/", f"transformer.layers.{i}."
        for xn, hn in (
            ("rms_norm/scale", "pre_attn_norm.scale"),
            ("rms_norm_1/scale", "post_attn_norm.scale"),
            ("rms_norm_2/scale", "pre_ffn_norm.scale"),
            ("rms_norm_3/scale", "post_ffn_norm.scale"),
        ):
            m[x + xn] = (h + hn, False)
        for xn, hn in (
            ("multi_head_attention/query/w", "q_proj.weight"),
            ("multi_head_attention/key/w", "k_proj.weight"),
            ("multi_head_attention/value/w", "v_proj.weight"),
            ("multi_head_attention/linear/w", "o_proj.weight"),
            ("linear/w", "gate_proj.weight"),  # gelu(x @ linear) * (x @ linear_v)
            ("linear_v/w", "up_proj.weight"),
            ("linear_1/w", "down_proj.weight"),
        ):
            m[x + xn] = (h + hn, True)  # Haiku [in, out] -> torch [out, in]
    return m


# Present in X's retrieval export (its training temperature), read into a buffer.
_OPTIONAL_KEYS = {"~/log_temperature": "log_temperature"}


def load_params(folder: str | Path, model: nn.Module, kind: str) -> None:
    """Copy ``model_params.npz`` into ``model``; every key must be known, present, numeric and
    of the shape the config implies."""
    path = _need(Path(folder) / PARAM_FILE)
    mapping = param_map(kind, model.config.transformer.num_layers)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz ({e})") from e
    with npz:
        keys = set(npz.files)
        unknown = sorted(keys - set(mapping) - set(_OPTIONAL_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (not part of Phoenix's {kind})")
        missing = sorted(set(mapping) - keys)
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for key in sorted(keys):
                try:
                    arr = npz[key]
                except ValueError as e:  # object arrays need pickle: refused
                    raise ValueError(f"{path}: {key} is not a numeric array ({e})") from e
                if arr.dtype.kind not in "fiu":
                    raise ValueError(f"{path}: {key} has dtype {arr.dtype}, expected numbers")
                if key in _OPTIONAL_KEYS:
                    target = buffers[_OPTIONAL_KEYS[key]]
                    transpose = False
                else:
                    name, transpose = mapping[key]
                    target = params[name]
                t = torch.from_numpy(np.array(arr, order="C"))
                t = t.T if transpose else t
                if tuple(t.shape) != tuple(target.shape):
                    want = tuple(target.shape)[::-1] if transpose else tuple(target.shape)
                    raise ValueError(
                        f"{path}: {key} has shape {list(arr.shape)}, the config implies "
                        f"{list(want)}"
                    )
                target.copy_(t.to(target.dtype))


def _npy_header(f, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise ValueError(f"{what}: not a numpy array ({e})") from e
    raise ValueError(f"{what}: npy format version {version} is not supported")


def stream_tables(folder: str | Path, weight: torch.Tensor, hash_config: HashConfig) -> None:
    """Stream ``embedding_tables.npz`` into the fused table ``weight`` [rows, D], chunk by chunk.

    Rows before the user block (padding and reserved) become zero, as in X's unified table.
    Peak extra memory is one chunk, whatever the size of the tables.
    """
    path = _need(Path(folder) / TABLE_FILE)
    D = weight.shape[1]
    with torch.no_grad():
        weight[: hash_config.offset("user")].zero_()
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz ({e})") from e
    with zf:
        names = {n.removesuffix(".npy") for n in zf.namelist()}
        unknown = sorted(names - set(TABLE_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}, expected {sorted(TABLE_KEYS)}")
        missing = sorted(set(TABLE_KEYS) - names)
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        for key, entity in TABLE_KEYS.items():
            N, off = hash_config[entity].num_buckets, hash_config.offset(entity)
            with zf.open(key + ".npy") as f:
                shape, fortran, dtype = _npy_header(f, f"{path}: {key}")
                if dtype.kind != "f" or dtype.hasobject:
                    raise ValueError(f"{path}: {key} has dtype {dtype}, expected floats")
                if tuple(shape) != (N, D):
                    raise ValueError(
                        f"{path}: {key} has shape {list(shape)}, the config implies {[N, D]}"
                    )
                if fortran:
                    raise ValueError(f"{path}: {key} is Fortran-ordered, expected C order")
                buf = bytearray(min(_ROWS_PER_CHUNK, N) * D * dtype.itemsize)
                for a in range(0, N, _ROWS_PER_CHUNK):
                    n = min(_ROWS_PER_CHUNK, N - a)
                    view = memoryview(buf)[: n * D * dtype.itemsize]
                    got = 0
                    while got < len(view):
                        r = f.readinto(view[got:])
                        if not r:
                            raise ValueError(f"{path}: {key} is truncated")
                        got += r
                    chunk = np.frombuffer(view, dtype=dtype).reshape(n, D)
                    chunk = chunk.astype(dtype.newbyteorder("="), copy=False)
                    with torch.no_grad():
                        weight[off + a : off + a + n].copy_(torch.from_numpy(chunk))
