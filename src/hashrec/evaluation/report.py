"""Reports of an experiment: the Markdown results table and plots (matplotlib is imported here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["format_results", "plot_run"]


def format_results(results: dict[str, dict], actions: tuple[str, ...]) -> str:
    """Markdown table: AUC per action, GAUC(long_view or first), NDCG@10 of click."""
    shown = [a for a in ("click", "long_view", "like") if a in actions] or list(actions[:3])
    g_action = "long_view" if "long_view" in actions else actions[0]
    n_action = "click" if "click" in actions else actions[0]
    head = "| model | " + " | ".join(f"AUC {a}" for a in shown)
    head += f" | GAUC {g_action} | NDCG@10 {n_action} | calib {n_action} |"
    lines = [head, "|" + "---|" * (len(shown) + 4)]
    for name, m in results.items():
        cells = [f"{m['auc'][a]:.3f}" for a in shown]
        cells += [f"{m['gauc'][g_action]:.3f}", f"{m['ndcg'].get(n_action, float('nan')):.3f}",
                  f"{m['calibration'][n_action]:.2f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_run(results: dict[str, dict], losses: dict[str, list[float]], actions: tuple[str, ...],
             path: Path) -> None:  # fmt: skip
    """PNG: training curves (left) and AUC per action, every model side by side (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
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
    names = list(results)
    x = np.arange(len(actions))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [results[name]["auc"][a] for a in actions]
        ax2.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax2.set_xticks(x)
    ax2.set_xticklabels(actions, rotation=30, ha="right")
    lowest = min((v for m in results.values() for v in m["auc"].values() if v == v), default=0.5)
    ax2.set_ylim(min(0.45, lowest - 0.05), 1.0)
    ax2.axhline(0.5, color="gray", lw=0.8)
    ax2.set_ylabel("AUC (evaluation days)")
    ax2.set_title("AUC per action")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
