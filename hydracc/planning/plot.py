"""Draw a plan as a picture: a layers x heads heat map of the deciding score, full heads marked.

Design decisions: matplotlib is an optional dependency (``hydracc[plot]``), imported only
here and only when a picture is asked for, with the non-interactive ``Agg`` backend so it
works on servers. The picture is drawn from the plan alone (its per-head ``scores``), so a
saved plan file can be drawn again later. The file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydracc.errors import OutputError
from hydracc.planning.plan import Plan


def draw_plan(plan: Plan, path: str | Path, *, score: str = "sensitivity") -> Path:
    """Write a PNG heat map of ``score`` per (layer, head) with full heads outlined; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heads = max(lp.num_heads for lp in plan.layers)
    grid = np.full((len(plan.layers), heads), np.nan)
    has_scores = False
    for i, lp in enumerate(plan.layers):
        for h, hp in enumerate(lp.heads):
            if score in hp.scores:
                grid[i, h] = hp.scores[score]
                has_scores = True
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2.5), max(3.0, 0.4 * len(plan.layers) + 1.5)), dpi=120)
    image = ax.imshow(grid if has_scores else np.zeros_like(grid), cmap="viridis", aspect="auto")
    if has_scores:
        fig.colorbar(image, ax=ax, label=score)
    for i, lp in enumerate(plan.layers):
        for h in lp.full_heads():
            ax.add_patch(matplotlib.patches.Rectangle((h - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            ax.text(h, i, "F", ha="center", va="center", color="white", fontsize=8, fontweight="bold")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(len(plan.layers)), [str(lp.layer) for lp in plan.layers])
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    budget = plan.budget
    ax.set_title(f"{budget.get('strategy', 'plan')}: full heads outlined (F)" + ("" if has_scores else ", no scores in plan"), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
    return out
