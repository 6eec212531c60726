"""Data-parallel training over processes: torchrun environment, DDP, the table's gradients.

One process and N processes on the same global batch train the same model (DESIGN §7):

- **Process group** from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``): gloo for CPU training, nccl for CUDA, chosen from the device.
  Collectives time out after ``timeout_s``, so a rank that died makes the others stop with an
  error rather than wait forever.
- **Batches**: each global batch of ``batch_size`` requests (the same requests, in the same order,
  as in one process) is cut into ``world`` contiguous slices; rank r trains on slice r.
- **Loss**: the masked means of ``ranking_loss`` divide by counts summed over all ranks, so the
  ranks' losses add up to the loss of the whole global batch; DDP then averages gradients (it
  divides by ``world``, hence the factor ``world`` on each rank's loss).
- **Dense weights** under ``DistributedDataParallel``; the hash table is kept out of DDP: either
  replicated, its sparse row gradients gathered from every rank and summed in a fixed order (so
  the replicas stay bit-identical), or sharded through TorchRec (``hashrec.training.sharded``).
- **Rank 0** logs, evaluates and writes checkpoints. A checkpoint holds the whole table in the
  one-process format, so it loads under any process count.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hashrec.models.losses import LossTerms

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TABLE_SHARDING",
    "DataParallel",
    "DistContext",
    "DistributedError",
    "ReplicatedTable",
    "StepLoss",
    "env_world",
    "gather_sparse_rows",
    "global_loss",
    "global_mean",
    "rank_slice",
    "resolve_sharding",
    "seed_rank",
    "setup",
    "teardown",
    "wrap_dense",
]

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: another process died, hung past the timeout, or the network broke.

    >>> try:
    ...     raise DistributedError("rank 1 did not answer within 300 s")
    ... except RuntimeError as e:  # a RuntimeError: the CLI reports it as one line, exit 1
    ...     print(e)
    rank 1 did not answer within 300 s
    """


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""

    def read(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r}, expected an integer") from None

    world = read("WORLD_SIZE", 1)
    rank, local = read("RANK", 0), read("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world`` processes and its device.

    >>> ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    >>> ctx.is_main, ctx.distributed
    (True, False)
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @contextmanager
    def collectives(self, what: str) -> Iterator[None]:
        """Turn a failed collective into a ``DistributedError`` that says what probably happened.

        Other errors (a bad shape, a bug) pass through unchanged.
        """
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:
            if not self.distributed or not _lost_contact(e):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: another process probably "
                f"died or stalled (collective timeout {self.timeout_s:g} s). Cause: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e


_TRANSPORT_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe")


def _lost_contact(e: RuntimeError) -> bool:
    """Whether an error comes from the transport between processes (not from the model)."""
    dist_error = getattr(dist, "DistError", ())
    text = str(e).lower()
    return isinstance(e, dist_error) or any(m in text for m in _TRANSPORT_MARKERS)


def setup(
    device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistContext:
    """Join the process group torchrun describes (a no-op outside torchrun).

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK`` and nccl; anything else gloo on CPU. Calling it
    again in the same process reuses the group.
    """
    rank, world, local = env_world()
    dev = torch.device(device or "cpu")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    ctx = DistContext(rank, world, local, dev, timeout_s)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if dev.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {rank} of {world}: could not join the process group ({backend}, "
                f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}"
            ) from e
    return ctx


_DONE_KEY = "hashrec/rank0_done"


def teardown(wait: bool = True) -> None:
    """Leave the process group, if this process joined one: every rank once rank 0 is done
    (``wait=False``, on an error: at once, so torchrun stops the others without delay).

    Rank 0 still evaluates and writes after training while the other ranks have finished; a
    rank that tore its gloo group down meanwhile was seen to abort ("terminate called without
    an active exception", about one run in ten of the two-process test). So rank 0 marks the
    end in the rendezvous store and the others wait for that mark (no collective, so no
    timeout however long rank 0's evaluation; if rank 0 dies, torchrun stops them)."""
    if not dist.is_initialized():
        return
    if wait:
        try:
            store = dist.distributed_c10d._get_default_store()
            if dist.get_rank() == 0:
                store.set(_DONE_KEY, "1")
            else:
                store.wait([_DONE_KEY], datetime.timedelta(days=1))
        except (RuntimeError, AttributeError, ValueError):  # no store (or it is gone): leave
            pass
    dist.destroy_process_group()


def seed_rank(seed: int, ctx: DistContext) -> None:
    """Give each rank its own torch random stream (``seed + rank``) once the model is built.

    The model's initial weights are rank 0's either way (DDP and the table broadcast them), and
    the order of the requests is seeded by (seed, epoch) alone, the same on every rank: it has
    to be, each rank takes its slice of the same global batch. One process: nothing changes.
    """
    if ctx.distributed:
        torch.manual_seed(seed + ctx.rank)


def rank_slice(
    indices: np.ndarray, rank: int, world: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Rank ``rank``'s contiguous share of one global batch (sizes differ by at most 1).

    With ``groups`` (a key per index in contiguous runs, e.g. each request's user), every cut
    moves forward to the next run's start, so no run is split between ranks (a pairwise loss
    needs each user's candidates on one rank); shares may then differ more, or be empty.

    >>> rank_slice(np.arange(5), 1, 2)
    array([3, 4])
    >>> rank_slice(np.arange(5), 1, 2, groups=np.array([7, 7, 7, 8, 8]))  # the 7s stay together
    array([3, 4])
    >>> rank_slice(np.arange(5), 0, 2, groups=np.array([7, 7, 8, 8, 8]))  # cut at 3 -> 5
    array([0, 1, 2, 3, 4])
    >>> rank_slice(np.arange(5), 1, 2, groups=np.array([7, 7, 8, 8, 8]))  # a stand-in's rank
    array([], dtype=int64)
    """
    if groups is None:
        return np.array_split(indices, world)[rank]
    n = len(indices)
    if np.shape(groups) != (n,):
        raise ValueError(f"rank_slice: groups has shape {list(np.shape(groups))}, expected [{n}]"
                         " (one key per index)")  # fmt: skip
    even = np.cumsum([len(p) for p in np.array_split(np.arange(n), world)])[:-1]
    starts = np.r_[np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]), n]
    edges = np.r_[0, starts[np.searchsorted(starts, even)], n]
    return indices[edges[rank] : edges[rank + 1]]


@dataclass(frozen=True)
class StepLoss:
    """One step's loss: ``backward`` for this rank; ``value``, ``examples``: the global batch.

    >>> s = StepLoss(backward=torch.tensor(0.35), value=0.7, examples=512)
    >>> s.value, s.examples  # rank r's backward is its share; the shares add up to value
    (0.7, 512)
    """

    backward: torch.Tensor
    value: float
    examples: int


def global_loss(terms: LossTerms, continuous_weight: float, examples: int, ctx: DistContext,
                weight: float = 1.0) -> StepLoss:  # fmt: skip
    """This rank's share of the global batch's loss, and that loss.

    The counts of every rank are summed first, so the ranks' losses add up to the global batch's
    loss. ``weight`` 0 marks a stand-in batch (a rank with no requests in a short last batch)
    that joins the collectives but adds nothing. One process: ``terms.loss`` exactly.
    """
    if not ctx.distributed:
        loss = terms.loss(continuous_weight)
        return StepLoss(loss, float(loss.detach()), examples)
    counts = torch.stack([terms.bce_count, terms.abs_err_count]).detach()
    counts = torch.cat([counts, counts.new_tensor([examples])]) * weight
    with ctx.collectives("summing the loss counts"):
        dist.all_reduce(counts)
    part = weight * terms.loss(continuous_weight, counts[0], counts[1])
    logged = part.detach().clone()
    with ctx.collectives("summing the loss"):
        dist.all_reduce(logged)
    # DDP averages gradients over ranks: scale by world so the average is the global gradient
    return StepLoss(part * ctx.world, float(logged), int(counts[2]))


def global_mean(
    total: torch.Tensor, count: torch.Tensor, ctx: DistContext, weight: float = 1.0
) -> tuple[torch.Tensor, float]:
    """A mean over the global batch from each rank's ``total`` (0-d, with its graph) and
    ``count`` (e.g. ``pairwise_terms``): (this rank's backward term, the global mean). The
    counts are summed over ranks first, so the mean weighs every item alike however the ranks'
    counts differ (not a mean of the ranks' means); ``weight`` as in ``global_loss``."""
    if not ctx.distributed:
        mean = total / count.clamp(min=1)
        return mean, float(mean.detach())
    n = (count.detach().to(total.dtype) * weight).reshape(1)
    with ctx.collectives("summing the counts"):
        dist.all_reduce(n)
    part = weight * total / n.clamp(min=1)[0]
    logged = part.detach().clone()
    with ctx.collectives("summing the loss"):
        dist.all_reduce(logged)
    return part * ctx.world, float(logged)  # DDP averages over ranks: see ``global_loss``


def gather_sparse_rows(grad: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a table's sparse row gradient over all ranks; every rank gets the same result.

    Rows and values of every rank are gathered (padded to the longest), then the rows are
    stably sorted and each run of equal rows summed in rank order with ``embedding_bag``: a fixed
    order, so all replicas apply bit-identical updates (``index_add_``/``coalesce`` on CUDA are
    not ordered). Returns a coalesced sparse ``[rows, D]`` gradient, the mean over ranks
    (matching DDP's averaging of the dense gradients).
    """
    g = grad.coalesce() if not grad.is_coalesced() else grad
    rows, vals = g.indices()[0], g.values()
    n = torch.tensor([rows.numel()], device=rows.device)
    with ctx.collectives("gathering the table gradient"):
        sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
        dist.all_gather(sizes, n)
        longest = int(max(int(s) for s in sizes))
        pad = longest - rows.numel()
        rows_p = F.pad(rows, (0, pad), value=0)
        vals_p = F.pad(vals, (0, 0, 0, pad))
        all_rows = [torch.empty_like(rows_p) for _ in range(ctx.world)]
        all_vals = [torch.empty_like(vals_p) for _ in range(ctx.world)]
        dist.all_gather(all_rows, rows_p)
        dist.all_gather(all_vals, vals_p)
    r = torch.cat([x[: int(s)] for x, s in zip(all_rows, sizes, strict=True)])
    v = torch.cat([x[: int(s)] for x, s in zip(all_vals, sizes, strict=True)]).float()
    sorted_rows, order = torch.sort(r, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    summed = F.embedding_bag(order, v, starts, mode="sum") / ctx.world  # [U, D]
    return torch.sparse_coo_tensor(uniq[None], summed.to(vals.dtype), g.shape,
                                   is_coalesced=True, check_invariants=False)  # fmt: skip


TABLE_SHARDING = ("auto", "replicated", "column_wise", "table_wise", "row_wise")


def resolve_sharding(table_sharding: str, ctx: DistContext) -> str | None:
    """The table's layout over ranks: None (one process), "replicated" or a TorchRec type.

    "auto": column-wise (Phoenix's layout) when TorchRec is installed, else replicated.
    """
    from hashrec.training.sharded import INSTALL_HINT, torchrec_available

    if table_sharding not in TABLE_SHARDING:
        raise ValueError(f"table_sharding must be one of {TABLE_SHARDING}, got {table_sharding!r}")
    if not ctx.distributed:
        return None
    if table_sharding == "auto":
        return "column_wise" if torchrec_available() else "replicated"
    if table_sharding != "replicated" and not torchrec_available():
        raise RuntimeError(f"table_sharding={table_sharding!r}: {INSTALL_HINT}")
    return table_sharding


class ReplicatedTable:
    """The fused table replicated on every rank; ``sync`` sums its sparse gradients over ranks.

    Replicas start equal (``DataParallel`` broadcasts rank 0's table); equal gradients and a
    deterministic optimizer keep them equal.
    """

    def __init__(self, weight: nn.Parameter, ctx: DistContext) -> None:
        self.weight, self.ctx = weight, ctx

    def sync(self) -> None:
        w, g = self.weight, self.weight.grad
        if g is None:  # no row looked up on this rank: it still joins the gather
            rows = torch.zeros(1, 0, dtype=torch.int64, device=w.device)
            g = torch.sparse_coo_tensor(rows, w.new_zeros(0, w.shape[1]), w.shape)
        if not g.is_sparse:
            with self.ctx.collectives("averaging the table gradient"):
                dist.all_reduce(g)
            g /= self.ctx.world
            return
        self.weight.grad = gather_sparse_rows(g, self.ctx)


def wrap_dense(model: nn.Module, ctx: DistContext, ignore: list[str]) -> nn.Module:
    """``model`` under DDP, the parameters named in ``ignore`` (the table) left out of it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    with ctx.collectives("wrapping the model in DDP"):
        return DDP(model, device_ids=device_ids)


class DataParallel:
    """A ranker run over the ranks of ``ctx``: dense weights under DDP, the table replicated or
    sharded (``resolve_sharding``).

    One process: the model itself, untouched. The trainer calls ``begin`` before its first step
    and ``end`` after its last, calls it like the model, then ``backward(loss)`` (gradients
    averaged over ranks), then steps its optimizers; a checkpoint is written inside
    ``full_table`` (a sharded table is put back together for it).

    >>> from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
    >>> cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=31),
    ...                    transformer=TransformerConfig(dim=8, num_layers=1))
    >>> ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    >>> DataParallel(PhoenixRanker(cfg), ctx).local_requests(np.arange(4))
    (array([0, 1, 2, 3]), 1.0)
    """

    def __init__(self, model: nn.Module, ctx: DistContext, table_sharding: str = "auto") -> None:
        self.ctx, self.model = ctx, model
        self.sharding = resolve_sharding(table_sharding, ctx)
        self.replicated: ReplicatedTable | None = None
        self.sharded = None  # a ShardedTable between begin() and end()
        self.module = model
        if ctx.distributed:
            with ctx.collectives("broadcasting the table"), torch.no_grad():
                dist.broadcast(model.table.weight.data, src=0)  # every rank starts from rank 0's
            if self.sharding == "replicated":
                self.replicated = ReplicatedTable(model.table.weight, ctx)
            self.module = wrap_dense(model, ctx, ignore=["table.weight"])

    def local_requests(
        self, indices: np.ndarray, groups: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        """(this rank's requests of a global batch, loss weight); ``groups``: runs of
        requests kept on one rank (``rank_slice``).

        A rank left without requests (a last batch shorter than ``world``, or one user's run
        taking it all) trains on a stand-in, the batch's first request, with weight 0: it must
        take part in every collective.
        """
        mine = rank_slice(indices, self.ctx.rank, self.ctx.world, groups)
        return (mine, 1.0) if len(mine) else (indices[:1], 0.0)

    def __call__(self, batch, side=None):
        with self.ctx.collectives("the forward pass"):
            return self.module(batch, side=side)

    def backward(self, loss: torch.Tensor) -> None:
        with self.ctx.collectives("the backward pass (DDP gradient all-reduce)"):
            loss.backward()
        if self.replicated is not None:
            self.replicated.sync()

    # -- a sharded table: into TorchRec's shards for training, back for checkpoints ----------

    def begin(self, table_optimizer: torch.optim.Optimizer) -> None:
        """Shard the table (if sharding): its weights and accumulator move into the shards."""
        if self.sharding in (None, "replicated") or self.sharded is not None:
            return
        from hashrec.training.sharded import ShardedTable

        table = self.model.table
        group = table_optimizer.param_groups[0]
        state = table_optimizer.state.pop(table.weight, {})
        self.sharded = ShardedTable(table, self.ctx, self.sharding, group["lr"], group["eps"],
                                    state.get("sum"))  # fmt: skip
        table.backend = self.sharded.lookup
        table.weight.data = table.weight.data.new_empty(0, table.dim)  # the shards hold it

    @contextmanager
    def full_table(self, table_optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The whole table (and accumulator) in the model and optimizer for the block's time."""
        if self.sharded is None:
            yield
            return
        self._unshard(table_optimizer)
        try:
            yield
        finally:
            weight = self.model.table.weight
            weight.data = weight.data.new_empty(0, weight.shape[1])
            table_optimizer.state.pop(weight, None)

    def table_bytes(self, table_optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """(table bytes, optimizer-state bytes) this rank holds for the table."""
        if self.sharded is not None:
            return self.sharded.local_bytes()
        report = self.model.table.memory_report(table_optimizer)
        return report.table_bytes, report.optimizer_bytes

    def end(self, table_optimizer: torch.optim.Optimizer) -> None:
        """Put a sharded table back into the model (every rank gets the whole table)."""
        if self.sharded is None:
            return
        self._unshard(table_optimizer)
        self.model.table.backend = None
        self.sharded = None

    def _unshard(self, table_optimizer: torch.optim.Optimizer) -> None:
        weight, acc = self.sharded.gather()
        self.model.table.weight.data = weight
        table_optimizer.state[self.model.table.weight] = {"sum": acc}
