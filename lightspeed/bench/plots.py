"""Plots of benchmark results (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


NAMES = {"none": "no speculation", "hf-transformers": "HF transformers batched generate"}


def plot_user_vs_server(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """tokens/s/user (y) against tokens/s/server (x), one line per `series` (else per
    `speculative` setting), each point labelled with its concurrency (or batch size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    def series(r: dict) -> str:
        spec = r.get("speculative", "none")
        return r.get("series") or NAMES.get(spec, f"spec {spec}")

    for label in dict.fromkeys(series(r) for r in rows):
        pts = sorted((r.get("concurrency", r.get("batch_size")), r["tokens_per_s_server"], r["tokens_per_s_user"])
                     for r in rows if series(r) == label and r.get("tokens_per_s_user") is not None
                     and r.get("tokens_per_s_server") is not None)
        if not pts:
            continue
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for c, x, y in pts:
            ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens/s/server")
    ax.set_ylabel("tokens/s/user")
    ax.set_title(title or "tokens/s/user vs tokens/s/server (labels: concurrency)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
