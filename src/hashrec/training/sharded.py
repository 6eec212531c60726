"""The fused table sharded over processes through TorchRec, trained by FBGEMM's fused optimizer.

Optional: needs the ``distributed`` extra (TorchRec and FBGEMM; README "Multi-process training"
has the install recipe). Phoenix shards its table column-wise: each of N devices holds all rows
and D/N of the columns, so every lookup is answered by every device (an all-to-all of D/N-wide
slices). Table-wise puts the whole table on one rank; row-wise gives each rank a block of rows.

The table stays one ``FusedEmbeddingTable`` outside training: ``ShardedTable`` copies its weights
(and the row-wise Adagrad accumulator) into TorchRec's shards when training starts, and
``gather`` puts the whole table back together for a checkpoint and when training ends, so a
checkpoint has the one-process format and loads under any process count.

Optimizer: FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` is hashrec's ``RowWiseAdagrad`` (same formula).
Table-wise and row-wise sharding therefore train exactly the unsharded table. Column-wise keeps
one accumulator per row *per column shard* (FBGEMM's behaviour): a shard's step divides by the
mean square gradient of its own columns, not of the whole row. The checkpoint stores the
width-weighted mean of those accumulators, which is the whole row's accumulator, and a resumed
column-wise run starts every shard from it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from hashrec.nn.table import FusedEmbeddingTable
from hashrec.training.distributed import DistContext

__all__ = ["SHARDING_TYPES", "ShardedTable", "torchrec_available"]

SHARDING_TYPES = ("column_wise", "table_wise", "row_wise")
_TABLE, _FEATURE = "fused", "rows"
INSTALL_HINT = (
    "table sharding needs TorchRec: pip install 'hashrec[distributed]' "
    "(README: Multi-process training)"
)


def torchrec_available() -> bool:
    """True when TorchRec and FBGEMM import (the ``distributed`` extra is installed)."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError):  # OSError: a fbgemm build that does not fit this torch
        return False
    return True


class _Holder(nn.Module):
    def __init__(self, collection: nn.Module) -> None:
        super().__init__()
        self.collection = collection

    def forward(self, features):
        return self.collection(features)


class ShardedTable:
    """A ``FusedEmbeddingTable``'s weights sharded over the ranks of ``ctx`` (TorchRec).

    ``lookup(rows)`` replaces the local gather (set as the table's ``backend``): rows of every
    rank go to the shards that hold them and come back as vectors; the backward pass sends the
    gradients to those shards, where FBGEMM applies the row-wise Adagrad step at once (there is
    no table gradient for another optimizer to step). Gradients are averaged over ranks, like
    DDP's.

    Args:
        table: the table to shard (fp32); its weights are the starting point.
        ctx: this process's place in the process group.
        sharding: one of ``SHARDING_TYPES``.
        lr, eps: the row-wise Adagrad settings (``RowWiseAdagrad``'s).
        accumulator: optional [rows] float32 row-wise Adagrad state to start from.

    Needs an initialised process group; see ``tests/test_distributed.py`` for a two-process use.
    """

    def __init__(self, table: FusedEmbeddingTable, ctx: DistContext, sharding: str,
                 lr: float, eps: float = 1e-8,
                 accumulator: torch.Tensor | None = None) -> None:  # fmt: skip
        if sharding not in SHARDING_TYPES:
            raise ValueError(f"sharding must be one of {SHARDING_TYPES}, got {sharding!r}")
        if table.weight.dtype != torch.float32:
            raise ValueError(
                f"sharded tables are float32 here, got {table.weight.dtype} (train bf16 tables "
                "replicated, or in float32)"
            )
        if not torchrec_available():
            raise RuntimeError(INSTALL_HINT)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
        from torchrec.distributed.planner.storage_reservations import (
            FixedPercentageStorageReservation,
        )
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
        from torchrec.modules.embedding_configs import EmbeddingConfig
        from torchrec.modules.embedding_modules import EmbeddingCollection

        self.ctx, self.sharding = ctx, sharding
        self.rows, self.dim = table.num_rows, table.dim
        collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=_TABLE, embedding_dim=self.dim,
                                    num_embeddings=self.rows, feature_names=[_FEATURE])],
            device=torch.device("meta"),
        )  # fmt: skip
        holder = _Holder(collection)
        sharder = EmbeddingCollectionSharder(
            fused_params={
                "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                "learning_rate": lr,
                "eps": eps,
            }
        )
        # min_partition D/world: column-wise gives each rank one slice of D/world columns
        constraint = ParameterConstraints(
            sharding_types=[sharding], min_partition=max(1, self.dim // ctx.world)
        )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))  # processes per machine
        planner = EmbeddingShardingPlanner(
            topology=TopologyFactory.create_topology(
                TrainerConfig(world_size=ctx.world, local_world_size=local),
                kernel_config=KernelConfig(compute_device=ctx.device.type),
            ),
            constraints={_TABLE: constraint},
            storage_reservation=FixedPercentageStorageReservation(0.15),
        )
        with ctx.collectives("planning the table's shards"):
            plan = planner.collective_plan(holder, [sharder], dist.GroupMember.WORLD)
            self.module = DistributedModelParallel(
                holder, device=ctx.device, plan=plan, sharders=[sharder]
            )
        self.load(table.weight.detach(), accumulator)

    # -- the sharded state ------------------------------------------------------------------

    def _weight(self):
        return self.module.state_dict()[f"collection.embeddings.{_TABLE}.weight"]

    def _accumulator(self):
        (state,) = self.module.fused_optimizer.state_dict()["state"].values() or [{}]
        return state.get(f"{_TABLE}.momentum1")

    def _column_widths(self) -> list[int]:
        """Widths of the column blocks, in column order (one block [D] unless column-wise)."""
        shards = self._weight().metadata().shards_metadata
        return [w for _, w in sorted({(s.shard_offsets[1], s.shard_sizes[1]) for s in shards})]

    @torch.no_grad()
    def load(self, weight: torch.Tensor, accumulator: torch.Tensor | None = None) -> None:
        """Copy a whole table [rows, D] (and its [rows] accumulator) into this rank's shards."""
        if tuple(weight.shape) != (self.rows, self.dim):
            raise ValueError(
                f"weight has shape {list(weight.shape)}, expected {[self.rows, self.dim]}"
            )
        for shard in self._weight().local_shards():
            (r0, c0), (n, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(weight[r0 : r0 + n, c0 : c0 + w])
        acc = self._accumulator()
        if acc is None:
            return
        blocks = len(self._column_widths())
        full = torch.zeros(self.rows) if accumulator is None else accumulator.float().cpu()
        per_block = full.repeat(blocks)  # one accumulator per row per column block
        for shard in acc.local_shards():
            (o,), (n,) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(per_block[o : o + n])

    @torch.no_grad()
    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(whole table [rows, D], its row-wise accumulator [rows]) on every rank.

        Each rank writes its shards into zeros and an all-reduce adds them up: shards do not
        overlap, so the sum is the table, exactly. The accumulator of a row is the mean square
        gradient over all its columns: the width-weighted mean of the column blocks' ones.
        """
        dev = self.ctx.device
        weight = torch.zeros(self.rows, self.dim, device=dev)
        for shard in self._weight().local_shards():
            (r0, c0), (n, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            weight[r0 : r0 + n, c0 : c0 + w] = shard.tensor
        widths = self._column_widths()
        acc = torch.zeros(len(widths) * self.rows, device=dev)
        sharded_acc = self._accumulator()
        for shard in sharded_acc.local_shards() if sharded_acc is not None else []:
            (o,), (n,) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            acc[o : o + n] = shard.tensor
        with self.ctx.collectives("gathering the sharded table"):
            dist.all_reduce(weight)
            dist.all_reduce(acc)
        w = torch.tensor(widths, dtype=torch.float32, device=dev)[:, None]
        return weight, (acc.view(len(widths), self.rows) * w).sum(0) / self.dim

    def local_bytes(self) -> tuple[int, int]:
        """(table bytes, optimizer-state bytes) of this rank's shards."""

        def size(sharded) -> int:
            shards = sharded.local_shards() if sharded is not None else []
            return sum(s.tensor.numel() * s.tensor.element_size() for s in shards)

        return size(self._weight()), size(self._accumulator())

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """rows [n] int64 -> vectors [n, D]; row 0 (padding) gives zeros and no gradient."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        real = (flat != 0).nonzero().squeeze(1)
        ids = flat.index_select(0, real)
        features = KeyedJaggedTensor(
            keys=[_FEATURE], values=ids, lengths=torch.tensor([ids.numel()], device=flat.device)
        )
        with self.ctx.collectives("the sharded table lookup"):
            out = self.module(features)
            out = out.wait() if hasattr(out, "wait") else out
        vecs = out[_FEATURE].values()  # [len(ids), D]
        return vecs.new_zeros(flat.numel(), self.dim).index_copy(0, real, vecs)
