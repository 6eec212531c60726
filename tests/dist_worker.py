"""One rank of the multi-process tests: ``python tests/dist_worker.py SPEC.json``.

The test sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
starts one of these per rank. SPEC: {"log": csv path, "jobs": [{"dir", "max_steps", "resume",
"die_at", "table_sharding"}], "table_check": out path}. Each job trains the tiny ranker of
``tiny_trainer``; every rank then writes its weights to ``dir/rank<r>.safetensors`` so the test
can check the replicas agree. ``die_at`` n: rank 1 kills itself (no clean-up, like a crashed
machine) at its n-th forward pass. ``table_check``: compare TorchRec-sharded lookups and updates
with the unsharded table's, write the differences there (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
from hashrec.data import ExampleConfig, LogSchema, RowHashes, build_requests, load_log
from hashrec.training.distributed import DistributedError, teardown
from hashrec.training.trainer import TrainConfig, Trainer

from conftest import SCHEMA_JSON

BATCH = 16  # the global batch; 2 ranks take 8 requests each


def tiny_trainer(log_file, run_dir, **train):
    """(log, hashes, requests, trainer) of a tiny ranker on the synthetic log of ``conftest``."""
    log = load_log(str(log_file), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    cfg = RankerConfig(
        hash=HashConfig.uniform(num_buckets=31),
        transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=log.actions,
        continuous_actions=log.continuous_actions,
    )
    torch.manual_seed(0)
    model = PhoenixRanker(cfg)
    mask = log.days(None, 20220428)
    req = build_requests(
        log, mask, ExampleConfig(6, 4, negatives_per_request=1), negative_pool=np.flatnonzero(mask)
    )
    tc = TrainConfig(**{"epochs": 2, "batch_size": BATCH, "checkpoint_every": 1000, **train})
    return log, RowHashes(log, cfg.hash), req, Trainer(model, tc, run_dir, progress=False)


def capture_first_grads(trainer) -> dict[str, torch.Tensor]:
    """Fill the returned dict with the parameters' gradients of the first step (table dense;
    a sharded table has none: its fused optimizer has already applied them)."""
    grads: dict[str, torch.Tensor] = {}
    step = trainer.dense.step

    def recording_step(*args, **kwargs):
        if not grads:
            for name, p in trainer.model.named_parameters():
                g = p.grad
                if g is not None:
                    grads[name] = (g.to_dense() if g.is_sparse else g).detach().clone()
        return step(*args, **kwargs)

    trainer.dense.step = recording_step
    return grads


def _dying(forward, at: int):
    """``forward`` that kills the process at its ``at``-th call (no exception, no clean-up)."""
    calls = [0]

    def dying_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os._exit(17)
        return forward(*args, **kwargs)

    return dying_forward


def table_check(out_path: str) -> None:
    """Sharded vs unsharded table: lookups, then 2 training steps, for every sharding type.

    Each rank looks up its own rows (with padding, repeats and rows the other rank also uses)
    and weights them by its own coefficients; the reference runs one unsharded table on both
    ranks' lookups with the loss averaged over ranks, as data-parallel training does.
    Column-wise: FBGEMM keeps a row-wise accumulator per column block, so the reference steps
    each block as its own ``RowWiseAdagrad`` table.
    """
    from hashrec import FusedEmbeddingTable
    from hashrec.nn.optim import RowWiseAdagrad
    from hashrec.training import distributed
    from hashrec.training.sharded import SHARDING_TYPES, ShardedTable

    ctx = distributed.setup("cpu", 60)
    rows, dim, world = 40, 8, ctx.world
    g = torch.Generator().manual_seed(0)
    lookups = [torch.randint(0, rows, (2, 12), generator=g) for _ in range(world)]  # [step, n]
    lookups[0][:, :3] = 0  # padding
    coeffs = [torch.randn(2, 12, dim, generator=g) for _ in range(world)]
    diffs = {}
    for sharding in SHARDING_TYPES:
        torch.manual_seed(1)
        table = FusedEmbeddingTable(rows, dim)
        start = table.weight.detach().clone()
        sharded = ShardedTable(table, ctx, sharding, lr=0.1)
        blocks = [dim // 2, dim // 2] if sharding == "column_wise" else [dim]
        refs = [FusedEmbeddingTable(rows, w) for w in blocks]
        for ref, piece in zip(refs, start.split(blocks, dim=1), strict=True):
            ref.weight.data.copy_(piece)
        opts = [RowWiseAdagrad(r.parameters(), lr=0.1) for r in refs]
        d = {"lookup": 0.0, "weight": 0.0, "accumulator": 0.0}
        for step in range(2):
            out = sharded.lookup(lookups[ctx.rank][step])
            ref_out = [torch.cat([r(lk[step]) for r in refs], dim=1) for lk in lookups]
            d["lookup"] = max(d["lookup"], float((out - ref_out[ctx.rank]).abs().max()))
            (out * coeffs[ctx.rank][step]).sum().backward()
            ref_loss = sum((o * c[step]).sum() for o, c in zip(ref_out, coeffs, strict=True))
            (ref_loss / world).backward()
            for o in opts:
                o.step()
                o.zero_grad()
        weight, acc = sharded.gather()
        ref_w = torch.cat([r.weight.detach() for r in refs], dim=1)
        accs = [o.state[r.weight]["sum"] * w for o, r, w in zip(opts, refs, blocks, strict=True)]
        ref_acc = sum(accs) / dim
        d["weight"] = float((weight - ref_w).abs().max())
        d["accumulator"] = float((acc - ref_acc).abs().max())
        d["moved"] = float((ref_w - start).abs().max())  # the steps did change the table
        diffs[sharding] = d
    if ctx.is_main:
        Path(out_path).write_text(json.dumps(diffs))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    if spec.get("table_check"):
        table_check(spec["table_check"])
    for job in spec.get("jobs", []):
        log, hashes, req, trainer = tiny_trainer(
            spec["log"], job["dir"], max_steps=job.get("max_steps"),
            dist_timeout_s=spec.get("timeout_s", 60),
            table_sharding=job.get("table_sharding", "replicated"),
            pairwise_weight=job.get("pairwise_weight", 0.0),
        )  # fmt: skip
        if job.get("die_at") and rank == 1:
            trainer.model.forward = _dying(trainer.model.forward, job["die_at"])
        if job.get("resume"):
            assert trainer.resume(), f"no checkpoint in {job['dir']}"
        grads = capture_first_grads(trainer)
        trainer.fit(log, hashes, req)
        Path(job["dir"]).mkdir(parents=True, exist_ok=True)
        save_file(grads, str(Path(job["dir"]) / f"grads{rank}.safetensors"))
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        save_file(weights, str(Path(job["dir"]) / f"rank{rank}.safetensors"))
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except DistributedError as e:  # what the CLI prints too: one line, exit 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        teardown(wait=False)
        sys.exit(1)
    teardown()  # as the CLI does: a rank leaving while rank 0 still works may abort at exit
