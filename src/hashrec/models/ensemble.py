"""RankerEnsemble: several rankers of one configuration scored as one (the mean of their logits).

The seeds of one run (``hashrec train --seeds 3``) are the intended members: same
configuration, same inputs, different initialisations and batch orders. Measured on KuaiRand
(README, "Ensembles of seeds"): three seeds as one lift click AUC by 0.002-0.003 and like,
comment and profile_enter by 0.008-0.014 over one seed, at three times the scoring cost. The
evaluation rows of a run are this average, computed on the predictions
(``hashrec.evaluation.experiment.ensemble_probs``); this module does it inside the forward, so
``serve`` and ``recommend`` score with an ensemble as with one ranker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from hashrec.models.ranker import PhoenixRanker, RankerConfig, RankerOutput
from hashrec.nn.batch import RecsysBatch
from hashrec.nn.side import SideBatch
from hashrec.nn.transformer import AttentionKernel

__all__ = ["RankerEnsemble", "same_configuration"]


def same_configuration(a: RankerConfig, b: RankerConfig) -> bool:
    """Whether two rankers share one configuration, up to the attention kernel they run (a
    speed choice: the kernels agree; seeds trained before ``"auto"`` name ``"isolated"``).

    >>> from hashrec.hashing.config import HashConfig
    >>> from hashrec.nn.transformer import TransformerConfig
    >>> a = RankerConfig(hash=HashConfig.uniform(100), transformer=TransformerConfig(dim=8,
    ...                  num_q_heads=2, num_kv_heads=1, attention="isolated"))
    >>> same_configuration(a, replace(a, transformer=replace(a.transformer, attention="auto")))
    True
    """

    def kernel_free(c: RankerConfig) -> RankerConfig:
        return replace(c, transformer=replace(c.transformer, attention="auto"))

    return kernel_free(a) == kernel_free(b)


class RankerEnsemble(nn.Module):
    """``PhoenixRanker``s of one ``RankerConfig``: logits and continuous predictions averaged.

    >>> from hashrec import HashConfig, TransformerConfig
    >>> cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=11),
    ...                    transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=2,
    ...                                                  num_kv_heads=1))
    >>> ens = RankerEnsemble([PhoenixRanker(cfg), PhoenixRanker(cfg)])
    >>> len(ens), ens.config is ens.members[0].config
    (2, True)
    """

    def __init__(self, members: Sequence[PhoenixRanker]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a RankerEnsemble needs at least one ranker")
        for i, m in enumerate(members):
            if not isinstance(m, PhoenixRanker):
                raise ValueError(f"member {i} is a {type(m).__name__}, expected a PhoenixRanker")
            if not same_configuration(m.config, members[0].config):
                raise ValueError(
                    f"member {i}'s configuration differs from member 0's: an ensemble averages "
                    "rankers of one configuration (the seeds of one run)"
                )
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> RankerConfig:
        return self.members[0].config

    def __len__(self) -> int:
        return len(self.members)

    def forward(
        self,
        batch: RecsysBatch,
        kernel: AttentionKernel | None = None,
        side: SideBatch | None = None,
    ) -> RankerOutput:
        """Each member's ``forward``; the mean of their logits and continuous outputs."""
        outs = [m(batch, kernel=kernel, side=side) for m in self.members]
        if len(outs) == 1:
            return outs[0]
        return RankerOutput(
            torch.stack([o.logits for o in outs]).mean(0),
            torch.stack([o.continuous for o in outs]).mean(0),
            outs[0].candidate_mask,
        )
