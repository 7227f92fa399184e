"""Layer selections on the command line: `all`, a range `A-B`, or a list `i,j,k` (0-based)."""

from __future__ import annotations

from grains_edge.errors import GrainsError


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Sorted unique layer indices in [0, num_layers) named by `spec`."""
    text = spec.strip().lower()
    try:
        if text == "all":
            layers = list(range(num_layers))
        elif "-" in text and "," not in text:
            first, last = (int(part) for part in text.split("-"))
            layers = list(range(first, last + 1))
        else:
            layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise GrainsError(
            f"bad layer selection '{spec}' for a {num_layers}-layer model; "
            f"fix: use 'all', a range like 3-12, or a list like 4,8,12 (0 to {num_layers - 1})"
        )
    return sorted(set(layers))
