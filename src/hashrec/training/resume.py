"""Which settings may change when a run resumes from its checkpoint, and which may not.

A checkpoint records the run that wrote it: the model config, and in ``extra`` the split, the
example settings, the training settings and a fingerprint of the training rows. Resuming with any
difference that changes what the model learns would silently make a run that is neither the old
one nor the new one (a different batch size skips or repeats requests: the position is counted in
steps; a different learning rate would be ignored by the restored optimizer state). So every
difference is refused except these, which do not change the steps already taken:

* ``train.epochs``: more epochs continue a finished run (each epoch's order is seeded by
  (seed, epoch)); fewer than the checkpoint has started are refused, and so is any change under
  a decaying ``lr_schedule`` (it is planned over the epochs);
* ``train.max_steps``, ``train.checkpoint_every``: when to stop and save;
* ``train.compile``: how the transformer runs (the same function; with dropout the padded path
  it takes draws other masks, as a resumed run on another device may);
* ``model_config.transformer.attention``: which attention kernel computes it (they agree; runs
  written before ``"auto"`` became the default name ``"isolated"``);
* ``train.dist_timeout_s``, ``train.table_sharding``: how processes wait for each other and
  where the table lives; a checkpoint holds the whole table whatever the process count, and the
  position counts global batches, so a run may resume under another process count or layout;
* ``split.eval_start``, ``split.eval_end``: the evaluation days;
* ``train.refit``: whether a second model is trained after this one (``run_model``); the
  validated run itself does not change; ``refit`` (the refit model's record of the validated
  run): a validated run continued for more epochs may choose another epoch count, and the
  refit model then continues to it (its epochs are seeded as a straight run's);
* ``targets``, ``corpus`` (the two-tower's): what its evaluation counts and what it ranks at
  request time (a top-level name here covers everything under it);
* ``model``: the display name.

The device may change too (it is not part of the record).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ADDED_DEFAULTS", "MAY_CHANGE", "check_resumable", "resume_conflicts"]

MAY_CHANGE = frozenset(
    {"train.epochs", "train.max_steps", "train.checkpoint_every", "train.dist_timeout_s",
     "train.compile", "model_config.transformer.attention", "train.refit",
     "train.table_sharding", "split.eval_start", "split.eval_end", "model", "targets",
     "corpus", "refit"}
)  # fmt: skip


# Settings added after checkpoints were first written, with the value older versions ran with:
# a checkpoint without the key resumes when this run keeps that value.
ADDED_DEFAULTS: dict[str, Any] = {
    "train.pairwise_weight": 0.0,
    "train.lr_schedule": "constant",
    "train.order": "shuffled",
    "train.ema_decay": 0.0,
    "train.compile": False,
    "model_config.user_bias_rows": 0,
    "model_config.user_bias_actions": [],
    "model_config.user_bias_gain": 5.0,
    "model_config.user_bias_shrink": 0.5,
}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list | tuple):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: obj}


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every setting that differs between a checkpoint's record and this run, except
    ``MAY_CHANGE``, as ``"key: <saved> in the checkpoint, <current> now"``.

    A key absent from the checkpoint (written by an older version) is compared with the value
    older versions ran with (``ADDED_DEFAULTS``); keys not listed there are not compared.

    >>> saved = {"train": {"lr": 0.002, "epochs": 2}}
    >>> resume_conflicts(saved, {"train": {"lr": 0.01, "epochs": 3}})
    ['train.lr: 0.002 in the checkpoint, 0.01 now']
    >>> resume_conflicts(saved, {"train": {"lr": 0.002, "pairwise_weight": 0.0}})  # added later
    []
    >>> resume_conflicts(saved, {"train": {"lr": 0.002, "pairwise_weight": 0.1}})
    ['train.pairwise_weight: 0.0 in the checkpoint, 0.1 now']
    """
    old, new = _flatten(saved), _flatten(current)
    top = {k.split(".")[0].split("[")[0] for k in old}
    old.update({k: v for k, v in ADDED_DEFAULTS.items() if k in new and k not in old})
    out = []
    for key in sorted(set(old) | set(new)):
        name = key.split(".")[0].split("[")[0]
        if key in MAY_CHANGE or name in MAY_CHANGE or name not in top:
            continue
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a != b and not (a != a and b != b):  # NaN (a column never seen) equals NaN
            out.append(f"{key}: {a} in the checkpoint, {b} now")
    return out


def check_resumable(
    path: object,
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_state: dict[str, Any] | None,
    epochs: int,
) -> None:
    """Raise ValueError naming every conflicting setting between ``saved`` (the checkpoint at
    ``path``) and ``current``, epochs fewer than the checkpoint has already started, other
    epochs under a decaying ``lr_schedule`` (its length), or side features from a checkpoint
    that predates their recorded standardisation (``side_stats``)."""
    conflicts = resume_conflicts(saved, current)
    schedule = (current.get("train") or {}).get("lr_schedule", "constant")
    before = (saved.get("train") or {}).get("epochs")
    if schedule != "constant" and before is not None and before != epochs:
        conflicts.append(f"train.epochs: {before} in the checkpoint, {epochs} now, and the "
                         f"lr_schedule {schedule!r} decays over the planned epochs")  # fmt: skip
    rates = bool(current.get("rate_features"))
    if "side_stats" in current and "side_stats" not in saved and (current["side_stats"] or rates):
        conflicts.append("side_stats: none in the checkpoint (written before side numbers "
                         "were standardised by the training days' statistics), so its "
                         "features would change")  # fmt: skip
    if saved_state is not None:
        started = saved_state["epoch"] + (1 if saved_state["step_in_epoch"] else 0)
        if epochs < started:
            conflicts.append(f"train.epochs: {epochs} now, but the checkpoint has started "
                             f"epoch {started}")  # fmt: skip
    if conflicts:
        raise ValueError(
            f"{path}: cannot resume with settings that change training: "
            + "; ".join(conflicts)
            + ". Resume with the checkpoint's settings, or start a new run in another --out"
        )
