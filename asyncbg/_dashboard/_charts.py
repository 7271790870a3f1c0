"""Charts drawn on the server as inline SVG: no script, no CDN, readable at any width."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ._source import LATENCY_EDGES

__all__ = ["bars", "latency_labels"]


def _seconds(edge: float) -> str:
    return f"{edge / 60:g}m" if edge >= 60 else f"{edge:g}s"


def latency_labels() -> list[str]:
    """The labels of the latency buckets: ``<1s``, ``<2s``, ..., ``≥1h``."""
    return [f"<{_seconds(e)}" for e in LATENCY_EDGES] + [f"≥{_seconds(LATENCY_EDGES[-1])}"]


def bars(values: Sequence[int], *, labels: Sequence[str] = (), title: str,
         every: int = 1) -> str:
    """A bar chart of ``values`` as an SVG element that scales to its container's width.

    ``labels`` (one per bar) are written under every ``every``-th bar counted from the last;
    each bar has a tooltip with its label and value.
    """
    width, height, base = 900, 150, 130
    n = max(len(values), 1)
    step = width / n
    top = max(values, default=0) or 1
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" class="axis"/>']
    for i, value in enumerate(values):
        h = round(value / top * (base - 12), 1)
        label = labels[i] if i < len(labels) else str(i)
        parts.append(
            f'<rect x="{i * step + step * 0.1:.1f}" y="{base - h}" width="{step * 0.8:.1f}" '
            f'height="{h}"><title>{escape(label)}: {value:,}</title></rect>')
        if labels and (n - 1 - i) % every == 0:
            anchor = "end" if i == n - 1 and every > 1 else "middle"
            x = i * step + step if anchor == "end" else i * step + step / 2
            parts.append(f'<text x="{x:.1f}" y="{height - 4}" '
                         f'text-anchor="{anchor}">{escape(label)}</text>')
    parts.append(f'<text x="2" y="10" class="max">{top:,}</text></svg>')
    return "".join(parts)
