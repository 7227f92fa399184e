"""The frontier as a picture: behaviour change against perplexity change, one line per method, chosen point marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def envelope(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, gain) points no cheaper point beats: the upper-left frontier, by increasing cost."""
    frontier: list[tuple[float, float]] = []
    for cost, gain in sorted(points):
        if not frontier or gain > frontier[-1][1]:
            frontier.append((cost, gain))
    return frontier


def plot(
    methods: Mapping[str, Sequence[dict]],
    chosen: Mapping[str, dict | None],
    path: str | Path,
    title: str,
    behaviour: str,
    budget: float,
) -> Path:
    """Writes a PNG: every scored point of each method (dots), its frontier (line), its choice (star).
    Each point is a dict with `ppl_rise` (fraction) and `behaviour` (mean change, fraction)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (method, points) in enumerate(methods.items()):
        colour = colours[number % len(colours)]
        xy = [(100 * p["ppl_rise"], 100 * p["behaviour"]) for p in points]
        axes.scatter([x for x, _ in xy], [y for _, y in xy], s=14, color=colour, alpha=0.45)
        line = envelope(xy)
        axes.plot([x for x, _ in line], [y for _, y in line], color=colour, label=method)
        if chosen.get(method):
            point = chosen[method]
            axes.scatter(
                [100 * point["ppl_rise"]],
                [100 * point["behaviour"]],
                marker="*",
                s=220,
                color=colour,
                edgecolor="black",
                zorder=3,
                label=f"{method} chosen: {point['layers']}, α {point['alpha']:.3g}",
            )
    axes.axvline(100 * budget, color="grey", linestyle="--", linewidth=1)
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set_xlabel("perplexity change on Dolly responses (%)")
    axes.set_ylabel(f"{behaviour} change (points)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
