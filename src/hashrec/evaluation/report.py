"""Reports of an experiment: the Markdown results table and plots (matplotlib is imported here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["MIN_POSITIVES", "aggregate_seeds", "format_results", "plot_run", "shown_actions"]


MIN_POSITIVES = 100  # an action's AUC is shown when the evaluation rows have this many positives


def aggregate_seeds(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Metrics of several seeds -> their mean, with the sample std in ``"<metric>_std"``.

    ``runs``: model name -> one ``evaluate_predictions`` entry per seed. A baseline with one
    entry gets std 0 and ``seeds`` 1.

    >>> agg = aggregate_seeds({"m": [{"auc": {"click": 0.70}}, {"auc": {"click": 0.72}}]})
    >>> m = agg["m"]
    >>> round(m["auc"]["click"], 3), round(m["auc_std"]["click"], 4), m["seeds"]
    (0.71, 0.0141, 2)
    """
    out = {}
    for name, ms in runs.items():
        agg: dict = {"seeds": len(ms)}
        for metric in ms[0]:
            keys = ms[0][metric]
            vals = {k: np.array([m[metric][k] for m in ms], dtype=float) for k in keys}
            agg[metric] = {k: float(np.mean(v)) for k, v in vals.items()}
            agg[metric + "_std"] = {
                k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items()
            }
        out[name] = agg
    return out


def shown_actions(
    actions: tuple[str, ...], positives: dict[str, int] | None, min_positives: int = MIN_POSITIVES
) -> list[str]:
    """The actions whose AUC the table shows: every one with >= ``min_positives`` evaluation
    positives (all of them when the counts are unknown; the first if none qualifies)."""
    if positives is None:
        return list(actions)
    shown = [a for a in actions if positives.get(a, 0) >= min_positives]
    return shown or list(actions[:1])


def format_results(
    results: dict[str, dict],
    actions: tuple[str, ...],
    positives: dict[str, int] | None = None,
    min_positives: int = MIN_POSITIVES,
) -> str:
    """Markdown table: AUC of every action with >= ``min_positives`` evaluation positives,
    GAUC (long_view when the log has it, else its first action), NDCG@10 and calibration of
    click (else the first action). The columns follow the log's own actions. A result with
    ``"<metric>_std"`` entries (``aggregate_seeds``) shows ``mean ± std``."""
    shown = shown_actions(actions, positives, min_positives)
    g_action = "long_view" if "long_view" in actions else actions[0]
    n_action = "click" if "click" in actions else actions[0]
    head = "| model | " + " | ".join(f"AUC {a}" for a in shown)
    head += f" | GAUC {g_action} | NDCG@10 {n_action} | calib {n_action} |"
    lines = [head, "|" + "---|" * (len(shown) + 4)]

    def cell(m: dict, metric: str, action: str, digits: int = 3) -> str:
        v = m[metric].get(action, float("nan"))
        text = f"{v:.{digits}f}"
        std = m.get(metric + "_std", {}).get(action)
        if std is not None and m.get("seeds", 1) > 1:
            text += f" ± {std:.{digits}f}"
        return text

    for name, m in results.items():
        cells = [cell(m, "auc", a) for a in shown]
        cells += [cell(m, "gauc", g_action), cell(m, "ndcg", n_action),
                  cell(m, "calibration", n_action, 2)]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if positives is not None:
        counts = ", ".join(f"{a} {positives.get(a, 0):,}" for a in actions)
        lines.append("")
        lines.append(f"Evaluation positives: {counts} (AUC shown from {min_positives}).")
    return "\n".join(lines)


def plot_run(results: dict[str, dict], losses: dict[str, list[float]], actions: tuple[str, ...],
             path: Path, positives: dict[str, int] | None = None) -> None:  # fmt: skip
    """PNG: training curves (left; left out when ``losses`` holds none) and AUC per shown
    action (see ``format_results``), every model side by side, with error bars of the std over
    seeds when there are several (right), the legend beside the bars."""
    actions = tuple(shown_actions(actions, positives))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(losses.values()):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
        for name, ls in losses.items():
            if ls:
                w = max(1, len(ls) // 50)
                smooth = np.convolve(ls, np.ones(w) / w, mode="valid")
                ax1.plot(np.arange(len(smooth)) + w, smooth, label=name)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (moving average)")
        ax1.set_title("Training curve")
        ax1.grid(alpha=0.3)
        ax1.legend()
    else:  # results without curves (a study's merged runs): the AUC panel alone
        fig, ax2 = plt.subplots(figsize=(9, 4.5))
    names = list(results)
    x = np.arange(len(actions))
    width = 0.8 / max(1, len(names))
    colors = plt.get_cmap("tab20" if len(names) > 10 else "tab10").colors  # one per model
    for i, name in enumerate(names):
        vals = [results[name]["auc"][a] for a in actions]
        std = results[name].get("auc_std") if results[name].get("seeds", 1) > 1 else None
        err = [std[a] for a in actions] if std else None
        ax2.bar(
            x + i * width - 0.4 + width / 2,
            vals,
            width,
            yerr=err,
            capsize=2,
            label=name,
            color=colors[i % len(colors)],
        )
    ax2.set_xticks(x)
    ax2.set_xticklabels(actions, rotation=30, ha="right")
    lowest = min(
        (m["auc"][a] for m in results.values() for a in actions if m["auc"][a] == m["auc"][a]),
        default=0.5,
    )
    ax2.set_ylim(min(0.45, lowest - 0.05), 1.0)
    ax2.axhline(0.5, color="gray", lw=0.8)
    ax2.set_ylabel("AUC (evaluation days)")
    ax2.set_title("AUC per action" + (" (mean ± std over seeds)" if any(
        m.get("seeds", 1) > 1 for m in results.values()) else ""))  # fmt: skip
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over a bar
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
