"""What several commands share: errors and exit codes, option groups, data loading, configs.

Exit codes: 0 success; 2 usage errors (bad or conflicting options: argparse's convention);
1 data or runtime errors (a missing file, a bad column, a failed run). Either way the user sees
one line ``hashrec <command>: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hashrec.data import LogSchema

__all__ = [
    "UsageError",
    "add_corpus_options",
    "add_data_options",
    "add_log_options",
    "add_model_options",
    "corpus_config",
    "date",
    "int_list",
    "load_checkpoint_of",
    "load_corpus",
    "number",
    "out_file",
    "out_folder",
    "read_json_file",
    "side_store_for",
    "weights_option",
    "whole",
]

# Table layouts (hashrec.hashing.layouts); listed here so that --help imports no torch.
TABLE_SCHEMES = ("multihash", "hybrid", "weighted", "qr")
DEFAULT_TABLE_SCHEME = "hybrid"  # the best at 25% in benchmarks/study_tables.py
DEFAULT_PAIRWISE_WEIGHT = 0.0  # benchmarks/study_ranker.py
DEFAULT_HEAD_SHARE = 0.5  # = hashrec.data.tables.HEAD_SHARE (tests/test_cli.py holds them equal)


class UsageError(Exception):
    """Bad or conflicting options met past argparse: exit code 2.

    >>> import contextlib, io
    >>> from hashrec.cli import main
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     try:
    ...         main(["collisions", "--column", "video_id"])  # a column needs --csv
    ...     except SystemExit as e:
    ...         print("exit code", e.code)
    exit code 2
    >>> err.getvalue().strip()
    'hashrec collisions: error: --column needs --csv FILE'
    """


def int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def whole(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    return parse


def number(
    low: float = -math.inf, high: float = math.inf, low_open: bool = True, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in (low, high] (``low_open``) or [low, high]; with
    ``high_open``, below ``high``."""
    bound = f"{'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
    bound += (" and " if bound and high < math.inf else "") + (
        f"{'<' if high_open else '<='} {high:g}" if high < math.inf else ""
    )

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low)
        ok = ok and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return v

    return parse


def out_folder(path: str | Path, option: str = "--out") -> Path:
    """A run folder to write into: refused if it names an existing file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {p} is a file, expected a folder")
    return p


def out_file(path: str | Path, option: str = "--out") -> Path:
    """A file to write: refused if it names an existing folder, or its folder is a file; its
    folder is created now, before any work, so a bad path fails at once."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {p} is a folder, expected a file path (e.g. {p}/metrics.json)")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{option} {p}: {parent} is a file, not a folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {p}: cannot create its folder ({e.strerror})") from None
    return p


def date(text: str) -> int:
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a date like 2022-05-03, got {text!r}")
    from datetime import datetime

    try:
        datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a calendar date") from None
    return int(digits)


def read_json_file(text: str) -> Any:
    """The JSON value in the file ``text``: a clear error for a missing file or bad JSON."""
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such request file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def add_log_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, data_help: str) -> None:
    """--data (described by ``data_help``), --schema, --authors, --users: where a log is."""
    p.add_argument("--data", help=data_help)
    p.add_argument("--schema", help="JSON (file or string) mapping a generic log's columns")
    p.add_argument("--authors", help="table keyed by post: its author (if the log lacks authors) "
                   "and the post side features the schema declares")  # fmt: skip
    p.add_argument("--users", help="table keyed by user: the user side features the schema "
                   "declares")  # fmt: skip
    p.add_argument("--with-random-log", action="store_true",
                   help="KuaiRand folder: also read log_random_* (randomly exposed videos; "
                   "serving a model trained with it needs it too)")  # fmt: skip


def add_data_options(p: argparse.ArgumentParser) -> None:
    add_log_options(p, "KuaiRand folder, or a CSV/Parquet log with --schema (default: the "
                    "KuaiRand sample shipped with hashrec)")  # fmt: skip
    p.add_argument("--eval-start", type=date, default=20220503, help="first evaluation day")
    p.add_argument("--eval-end", type=date, default=None, help="last evaluation day")


def add_device_option(p: argparse.ArgumentParser, threads: bool = True) -> None:
    """``--device`` and (unless ``threads`` is False: the command has its own) ``--threads``."""
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] when available")
    if not threads:
        return
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: one per core). Two runs sharing a "
                   "machine should split the cores (e.g. --threads 1 each on 2 cores): "
                   "oversubscribed threads stall each other for seconds per step")  # fmt: skip


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op thread count from ``--threads`` (commands that have it)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def names(text: str) -> tuple[str, ...]:
    """'click,long_view' -> ("click", "long_view"); '' -> ()."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def name_values(text: str) -> dict[str, float]:
    """'like=3,follow=2' -> {"like": 3.0, "follow": 2.0}; '' or 'none' -> {}."""
    if text.strip().lower() in ("", "none"):
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated name=number pairs, got {text!r}"
            ) from None
    return out


# Defaults chosen by the validation sweep of benchmarks/study_ranker.py (never on evaluation
# days); README "Choosing the defaults" has the figures.
DEFAULT_ENTITY_WEIGHTS = "user=1,post=4,author=2,feature=2"
DEFAULT_DROPOUT = 0.1
DEFAULT_WEIGHT_DECAY = 0.01
DEFAULT_EPOCHS = 3
DEFAULT_ACTION_WEIGHTS = ""
DEFAULT_RATE_FEATURES = False
DEFAULT_EMA_DECAY = 0.998


def add_model_options(p: argparse.ArgumentParser, seeds: int = 3) -> None:
    g = p.add_argument_group("model")
    pos, nonneg = whole(1), whole(0)
    g.add_argument("--dim", type=pos, default=32, help="embedding / transformer width D")
    g.add_argument("--layers", type=pos, default=2)
    g.add_argument("--heads", type=pos, default=2, help="query heads")
    g.add_argument("--kv-heads", type=pos, default=1, help="key/value heads (GQA)")
    g.add_argument("--attention", choices=("auto", "isolated", "full"), default="auto",
                   help="the attention kernel, a speed choice (they agree): auto picks the "
                   "isolated kernel on a CPU and, on a GPU, the full mask while a layer's "
                   "logits fit in 2^27 (~1 GiB a layer kept for the backward at that size: "
                   "isolated needs less memory)")  # fmt: skip
    g.add_argument("--num-hashes", type=pos, default=2, help="hashes k per entity")
    g.add_argument("--table-fraction", type=number(0, 1e6), default=0.25,
                   help="the table's bytes as a fraction of the collision-free (one row per "
                   "ID) table's, shared between entities by --entity-weights (with "
                   "--entity-weights none: each block at this fraction of its IDs)")  # fmt: skip
    g.add_argument("--table-scheme", choices=TABLE_SCHEMES, default=DEFAULT_TABLE_SCHEME,
                   help="table layout: multihash (plain Phoenix), hybrid (private rows for the "
                   "most frequent training IDs, hashed tail), weighted (importance-weighted "
                   "hash embeddings), qr (quotient-remainder); default %(default)s")  # fmt: skip
    g.add_argument("--head-share", type=number(0, 1, low_open=False),
                   default=DEFAULT_HEAD_SHARE,
                   help="hybrid: share of each block's bytes spent on private rows for the "
                   "most frequent training IDs, the rest a hashed tail "
                   "(default %(default)s)")  # fmt: skip
    g.add_argument("--scheme", choices=("default", "phoenix"), default="default",
                   help="hash functions: splitmix64 or X's phoenix constants")  # fmt: skip
    g.add_argument("--entity-weights", type=name_values, default=DEFAULT_ENTITY_WEIGHTS,
                   help="how the rows are shared: entity=weight per distinct ID (user, post, "
                   f"author, feature); 'none': every entity gets --table-fraction of its IDs "
                   f"(default {DEFAULT_ENTITY_WEIGHTS})")  # fmt: skip
    g.add_argument(
        "--no-side-features",
        action="store_true",
        help="ignore the log's side features (video/user fields, history signals)",
    )
    g.add_argument("--rate-features", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_RATE_FEATURES,
                   help="feed the ranker the baselines' time-respecting smoothed user / post / "
                   "author rates of every action as numeric side features")  # fmt: skip
    g.add_argument("--user-bias-rows", type=nonneg, default=0,
                   help="rows of a per-user logit offset (0: none; ~2-3x the users): ranks "
                   "within a user better (GAUC) for some AUC (README, \"The ranker against "
                   "the classic models\"); count its bytes in the budget")  # fmt: skip
    g.add_argument("--user-bias-actions", type=names, default=(),
                   help="comma-separated actions that get the per-user offset (default: "
                   "every action)")  # fmt: skip
    g.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT,
                   help="dropout on the input tokens and candidate outputs")  # fmt: skip
    g.add_argument("--history-len", type=nonneg, default=32)
    g.add_argument("--max-candidates", type=pos, default=16)
    g.add_argument("--slate-window", type=number(0), default=3600.0, help="seconds (> 0)")
    g.add_argument("--negatives", type=nonneg, default=0, help="sampled negatives per request")
    t = p.add_argument_group("training")
    t.add_argument(
        "--epochs",
        type=pos,
        default=DEFAULT_EPOCHS,
        help="at most this many epochs (early stopping on the validation split)",
    )
    t.add_argument("--batch-size", type=pos, default=128, help="requests per step")
    t.add_argument("--lr", type=number(0, 10), default=2e-3, help="AdamW learning rate (dense)")
    t.add_argument("--table-lr", type=number(0, 100), default=0.05,
                   help="row-wise Adagrad (table)")  # fmt: skip
    t.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                   help="AdamW weight decay (dense weights)")  # fmt: skip
    t.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="the dense learning rate over the planned steps: constant, or "
                   "decaying to 0 by the last epoch's end (linear, cosine); the table's "
                   "Adagrad keeps --table-lr")  # fmt: skip
    t.add_argument("--ema-decay", type=number(0, 1, low_open=False, high_open=True),
                   default=DEFAULT_EMA_DECAY,
                   help="keep a moving average of the dense weights with this decay; "
                   "validation scores it and the run ends with it (0: off; default "
                   "%(default)s)")  # fmt: skip
    t.add_argument("--order", choices=("shuffled", "time"), default="shuffled",
                   help="the order each epoch visits the requests: shuffled (seeded), or "
                   "by time, oldest first, as a stream (the last steps on the latest "
                   "day)")  # fmt: skip
    t.add_argument(
        "--action-weights",
        type=name_values,
        default=DEFAULT_ACTION_WEIGHTS,
        help="loss weight per action, e.g. like=3,follow=3 (default 1 each)",
    )
    t.add_argument("--pairwise-weight", type=number(0, 1e6, low_open=False),
                   default=DEFAULT_PAIRWISE_WEIGHT,
                   help="weight of a pairwise loss over each user's (positive, negative) "
                   "candidate pairs, which teaches the order within a user (GAUC); > 0 also "
                   "batches each user's requests together (default %(default)s)")  # fmt: skip
    t.add_argument("--val-days", type=nonneg, default=1,
                   help="last training days held out for early stopping and best-epoch "
                   "selection (0: none)")  # fmt: skip
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this last fraction of the training impressions instead",
    )
    t.add_argument("--patience", type=pos, default=1,
                   help="epochs without validation improvement before stopping")  # fmt: skip
    t.add_argument("--refit", action="store_true",
                   help="once validation has chosen the epoch count, train a fresh model for "
                   "that many epochs on every training day, the validation days included "
                   "(in <out>/refit/: the model evaluated and the one to serve)")  # fmt: skip
    t.add_argument("--seed", type=nonneg, default=0)
    t.add_argument("--seeds", type=pos, default=seeds,
                   help="train this many seeds (seed, seed+1, ...); figures are their mean "
                   "and std, and with several a row scores them as one ensemble (serve it: "
                   f"serve --ranker with every seed's checkpoint) (default {seeds})")  # fmt: skip
    add_device_option(p)


def parse_schema(text: str) -> LogSchema:
    """--schema: a JSON object, or the path of a file holding one."""
    from hashrec.data import LogSchema

    if text.lstrip().startswith(("{", "[")) or text.strip() in ("null", "true", "false"):
        where, body = "--schema", text
    elif os.path.isfile(text):
        where, body = f"--schema {text}", Path(text).read_text()
    elif os.path.exists(text):
        raise UsageError(f"--schema {text} is a folder, expected a JSON file or a JSON object")
    else:
        raise FileNotFoundError(f"--schema {text}: no such file (give a JSON file or object)")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object mapping columns, got "
                         f"{type(obj).__name__} {body.strip()[:40]}")  # fmt: skip
    try:
        return LogSchema.from_dict(obj)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process")
    g.add_argument("--nproc", type=int, default=1,
                   help="train on N processes of this machine (launches torchrun; the global "
                   "batch is split over them). Pays for large models and tables: at the "
                   "demo's D = 32 one process with --threads 2 is faster than --nproc 2 on "
                   "2 cores (every step's collectives outweigh the halved work)")  # fmt: skip
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop when another process is silent this long (default 300)",
    )
    g.add_argument("--table-sharding", default=None,
                   help="the hash table over processes: auto (default: column_wise with "
                   "TorchRec installed, else replicated), replicated, column_wise, "
                   "table_wise or row_wise")  # fmt: skip


def load_data(args: argparse.Namespace):
    """The log named by --data/--schema/--authors (default: the shipped KuaiRand sample)."""
    from hashrec.data import load_kuairand, load_log
    from hashrec.datasets import kuairand_sample_dir

    path = args.data or kuairand_sample_dir()

    def say(message: str) -> None:
        print(message, flush=True)

    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if os.path.isdir(path):
        for given, flag in (
            (args.schema, "--schema"),
            (args.authors, "--authors"),
            (getattr(args, "users", None), "--users"),
        ):
            if given:
                raise UsageError(f"--data {path} is a KuaiRand folder; {flag} is for a log file")
        return load_kuairand(path, with_random=getattr(args, "with_random_log", False), say=say)
    if getattr(args, "with_random_log", False):
        raise UsageError("--with-random-log reads a KuaiRand folder; --data is a file")
    if not args.schema:
        raise UsageError(
            f"--data {path} is a file: give --schema (JSON file or string) mapping its "
            "columns, or a KuaiRand folder"
        )
    return load_log(
        path,
        parse_schema(args.schema),
        authors=args.authors,
        users=getattr(args, "users", None),
        say=say,
    )


def load_checkpoint_of(path: str, expected: str, device: Any = "cpu", option: str = "") -> tuple:
    """(model, info) of a safetensors checkpoint that must hold an ``expected`` model class."""
    from hashrec.training.checkpoint import load_checkpoint

    model, info = load_checkpoint(path, map_location=device)
    if info.model_class != expected:
        where = f"{option} {path}" if option else path
        raise ValueError(f"{where}: holds a {info.model_class}, expected a {expected}")
    return model, info


# what a checkpoint records about its inputs: rankers served as one ensemble must agree on it
# (the seeds of one run do; "train" holds each one's seed and may differ)
_ENSEMBLE_SHARED = ("split", "examples", "data", "side_features", "rate_features", "side_stats")


def refuse_repeated_paths(paths: list[str], option: str) -> None:
    """A UsageError naming the first of ``paths`` that names the same file as an earlier one
    (an ensemble would count that checkpoint twice)."""
    seen: set[str] = set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise UsageError(f"{option} {p} is given more than once (an ensemble would count "
                             "it twice)")  # fmt: skip
        seen.add(real)


def _differing(a: Any, b: Any) -> str:
    """What differs between two recorded values, briefly: the differing keys of two mappings,
    else both values (shortened)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted({k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}, key=str)
        return "differing entries " + ", ".join(map(str, keys[:8])) + (" ..." if keys[8:] else "")

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "..."

    return f"{short(a)} against {short(b)}"


def load_rankers(paths: str | list[str], device: Any = "cpu", option: str = "") -> tuple:
    """(model, info) of one ranker checkpoint, or of several as one ``RankerEnsemble`` (with the
    first checkpoint's info): their configurations and recorded inputs must agree, and all or
    none must be refit models."""
    from hashrec.models.ensemble import RankerEnsemble, same_configuration

    paths = [paths] if isinstance(paths, str) else list(paths)
    refuse_repeated_paths(paths, option)
    loaded = [load_checkpoint_of(p, "PhoenixRanker", device, option) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    first_model, first_info = loaded[0]
    first = first_info.extra
    for p, (model, info) in zip(paths[1:], loaded[1:], strict=True):
        if not same_configuration(model.config, first_model.config):
            raise ValueError(f"{option} {p}: its model configuration differs from {paths[0]}'s "
                             f"({_differing(model.config.to_dict(), first_model.config.to_dict())}"
                             "); an ensemble takes rankers of one configuration (the seeds of one "
                             "run)")  # fmt: skip
        for key in _ENSEMBLE_SHARED:
            if info.extra.get(key) != first.get(key):
                raise ValueError(f"{option} {p}: its recorded {key} differs from {paths[0]}'s "
                                 f"({_differing(info.extra.get(key), first.get(key))}); an "
                                 "ensemble takes the seeds of one run")  # fmt: skip
        if bool(info.extra.get("refit")) != bool(first.get("refit")):
            which = (p, paths[0]) if info.extra.get("refit") else (paths[0], p)
            raise ValueError(f"{option}: {which[0]} is a refit model (trained again on every "
                             f"training day), {which[1]} is not; an ensemble takes the refit "
                             "models of a --refit run, or the validated ones")  # fmt: skip
    return RankerEnsemble([m for m, _ in loaded]), first_info


def load_log_quietly(args: argparse.Namespace):
    """``load_data`` with its progress on stderr (stdout may carry JSON)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return load_data(args)


def add_corpus_options(p: argparse.ArgumentParser) -> None:
    """--active-days, --prior-weight, --prior-days of commands that serve a retriever; each
    defaults to the value stored in the retriever's checkpoint (``train-retrieval``)."""
    g = p.add_argument_group(
        "corpus and popularity prior (default: the values the retriever was trained with)"
    )
    g.add_argument("--active-days", type=_days_or_all, default=None, metavar="N",
                   help="only posts shown in the last N days of the log ('all': every "
                   "post)")  # fmt: skip
    g.add_argument("--prior-weight", type=float, default=None, metavar="BETA",
                   help="add BETA * log(1 + engagements) to cosine / temperature (0: "
                   "none)")  # fmt: skip
    g.add_argument("--prior-days", type=_days_or_all, default=None, metavar="N",
                   help="count the prior's engagements over the last N days ('all': every "
                   "day)")  # fmt: skip


_ALL = "all"


def _days_or_all(text: str) -> float | str:
    if text.strip().lower() == _ALL:
        return _ALL
    try:
        return float(text)
    except ValueError:
        msg = f"expected a number of days or 'all', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def corpus_config(args: argparse.Namespace, stored: dict | None):
    """The retriever's ``CorpusConfig``: the checkpoint's stored one, overridden by the
    command's --active-days / --prior-weight / --prior-days where given."""
    from hashrec.retrieval.corpus import CorpusConfig

    d = dict(stored or {})
    for name in ("active_days", "prior_weight", "prior_days"):
        v = getattr(args, name, None)
        if v is not None:
            d[name] = None if v == _ALL else v
    try:
        return CorpusConfig(**d)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def load_corpus(
    args: argparse.Namespace,
    actions: tuple[str, ...],
    rinfo=None,
    before_time: int | None = None,
):
    """(log, Corpus, CorpusConfig) from --data/--schema/--authors for ``hashrec recommend`` and
    ``hashrec serve --retriever``: the posts of the log (the recently active ones under
    ``active_days``), popularity counted on the retriever's target actions (over the last
    ``prior_days``), all as they stood at ``before_time`` (ms; default: after the log's last
    row). ``rinfo``: the retriever checkpoint's info (its stored corpus options).
    Progress goes to stderr (stdout may carry JSON); the log must have the retriever's
    ``actions``."""
    extra = rinfo.extra if rinfo is not None else {}
    config = corpus_config(args, extra.get("corpus"))
    log = load_log_quietly(args)
    if tuple(actions) != tuple(log.actions):
        raise ValueError(f"the retriever reads actions {tuple(actions)}, the data has "
                         f"{tuple(log.actions)}")  # fmt: skip
    # the prior counts the engagements the retriever was evaluated on (its targets)
    counted = extra.get("targets") or (extra.get("train") or {}).get("positive_actions")
    counted = [a for a in counted if a in log.actions] if counted else None
    return log, config.corpus(log, counted or None, before_time), config


def side_store_for(model: Any, info: Any, log: Any, option: str, data_flag: str = "--data"):
    """``hashrec.serving.store.checkpoint_side_store`` with the CLI's names in its messages
    (``option``: the checkpoint's flag, ``data_flag``: the log's) and its notice on stderr."""
    import sys

    from hashrec.serving.store import checkpoint_side_store

    def notice(message: str) -> None:
        print(f"notice: {message}", file=sys.stderr)

    return checkpoint_side_store(model, info, log, source=option, data=data_flag, notice=notice)


def weights_option(text: str | None) -> dict[str, float] | None:
    """--weights: a JSON object (file or string) of action -> number; None when not given."""
    if text is None:
        return None
    raw = Path(text).read_text() if os.path.exists(text) else text
    try:
        w = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"--weights is not JSON ({e})") from None
    if not isinstance(w, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in w.values()
    ):
        raise UsageError('--weights must map action names to finite numbers, e.g. {"click": 1}')
    return {str(k): float(v) for k, v in w.items()}


def experiment_specs(args: argparse.Namespace, log, split=None) -> tuple[Any, Any, Any]:
    """(ModelSpec, ExampleConfig, TrainConfig) from the model/training options; ``split``'s
    training days count the IDs of a hybrid table (default: every row of the log)."""
    import numpy as np

    from hashrec.data import ExampleConfig
    from hashrec.data.tables import table_config
    from hashrec.evaluation.experiment import ModelSpec
    from hashrec.nn.transformer import TransformerConfig
    from hashrec.training.trainer import TrainConfig

    if not 0 < args.table_fraction < math.inf:
        raise UsageError(f"--table-fraction must be a finite number > 0, got {args.table_fraction}")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.refit and args.val_days == 0 and args.val_fraction == 0:
        raise UsageError("--refit needs a validation split to choose the epoch count: "
                         "--val-days or --val-fraction > 0")  # fmt: skip
    if not 0 <= args.head_share < 1:
        raise UsageError(f"--head-share must be in [0, 1) (the hashed tail needs bytes), got "
                         f"{args.head_share}")  # fmt: skip
    try:
        tf = TransformerConfig(dim=args.dim, num_layers=args.layers, num_q_heads=args.heads,
                               num_kv_heads=args.kv_heads, widening_factor=2.0,
                               attention=args.attention)  # fmt: skip
        examples = ExampleConfig(args.history_len, args.max_candidates, args.slate_window,
                                 args.negatives)  # fmt: skip
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            table_lr=args.table_lr, seed=args.seed,
                            weight_decay=args.weight_decay, action_weights=args.action_weights,
                            pairwise_weight=args.pairwise_weight,
                            val_days=args.val_days, val_fraction=args.val_fraction,
                            patience=args.patience, refit=args.refit,
                            lr_schedule=args.lr_schedule, order=args.order,
                            ema_decay=args.ema_decay)  # fmt: skip
        unknown = set(args.action_weights) - set(log.actions)
        if unknown:
            raise ValueError(f"--action-weights names {sorted(unknown)}; the log's actions are "
                             f"{list(log.actions)}")  # fmt: skip
        if getattr(args, "dist_timeout", None) is not None:  # only ``train`` has these
            train = replace(train, dist_timeout_s=args.dist_timeout)
        if getattr(args, "table_sharding", None) is not None:
            train = replace(train, table_sharding=args.table_sharding)
        if getattr(args, "compile", False):
            train = replace(train, compile=True)
        weights = args.entity_weights or None
        scheme = args.table_scheme
        train_mask = split.masks(log)[0] if split is not None else np.ones(len(log.user), bool)
        cfg = table_config(log, train_mask, scheme, args.table_fraction, args.num_hashes,
                           dim=args.dim, hash_scheme=args.scheme, weights=weights,
                           head_share=args.head_share,
                           side_features=not args.no_side_features)  # fmt: skip
        name = spec_name(scheme, cfg["post"].num_hashes, args.table_fraction)
        if args.user_bias_rows:  # its bytes are on top of the table's
            name += f" + user offset ({args.user_bias_rows:,} rows)"
        spec = ModelSpec(name, cfg, tf,
                         dropout=args.dropout,
                         side_features=not args.no_side_features,
                         rate_features=args.rate_features,
                         user_bias_rows=args.user_bias_rows,
                         user_bias_actions=args.user_bias_actions)  # fmt: skip
        unknown = set(args.user_bias_actions) - set(log.actions)
        if unknown:
            raise ValueError(f"--user-bias-actions names {sorted(unknown)}; the log's actions "
                             f"are {list(log.actions)}")  # fmt: skip
        if len(set(args.user_bias_actions)) != len(args.user_bias_actions):
            raise ValueError(f"--user-bias-actions names an action twice: "
                             f"{','.join(args.user_bias_actions)}")  # fmt: skip
        if args.user_bias_rows >= 2**31:
            raise ValueError(f"--user-bias-rows must be < 2^31, got {args.user_bias_rows}")
        if args.user_bias_actions and not args.user_bias_rows:
            raise ValueError("--user-bias-actions needs --user-bias-rows > 0")
    except ValueError as e:  # an option that makes no valid model: a usage error
        raise UsageError(str(e)) from e
    return spec, examples, train


def spec_name(scheme: str, k: int, fraction: float) -> str:
    """``hashed k=2, 25% rows`` for plain Phoenix; ``hashed hybrid k=2, 25% bytes`` otherwise."""
    if scheme == "multihash":
        return f"hashed k={k}, {fraction:.0%} rows"
    return f"hashed {scheme}{'' if scheme == 'qr' else f' k={k}'}, {fraction:.0%} bytes"


def split(args: argparse.Namespace, train_end: int):
    from hashrec.evaluation.experiment import Split

    try:
        return Split(train_end=train_end, eval_start=args.eval_start, eval_end=args.eval_end)
    except ValueError as e:
        raise UsageError(str(e)) from e


def print_experiment(res) -> None:
    print()
    print(res.table)
    for name, i in res.models.items():
        print(
            f"{name}: {i['examples_per_s']:,.0f} training examples/s, "
            f"table {i['table_rows']:,} rows ({i['table_bytes'] / 2**20:.1f} MiB, "
            f"{i['table_share_of_full']:.0%} of the collision-free table"
            + (
                f"; per-user offset {i['user_bias_bytes'] / 2**20:.1f} MiB"
                if i.get("user_bias_bytes")
                else ""
            )
            + "), best epochs "
            f"{[e + 1 for e in i['best_epochs']]}"
        )
    seeds = ", ".join(map(str, res.seeds))
    print(f"ranker figures: mean ± std over seeds {seeds}; baselines are deterministic")
    if len(res.seeds) > 1:
        print("ensemble rows: each ranker's seeds as one model (the mean of their logits)")
    print(f"evaluated on {res.eval_impressions:,} impressions of {res.eval_users:,} users; "
          f"wall time {res.wall_s:.0f} s")  # fmt: skip
