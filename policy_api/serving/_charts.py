"""Server-rendered SVG line charts for the ops console: no script, no CDN, labelled axes.

Each series carries the numbers it plots (``data-series``, ``data-x``, ``data-y`` on its polyline), so
that a reader, a screen reader's table view or a test can check the chart against the JSON API.
"""

from __future__ import annotations

import html
import math

import numpy as np

__all__ = ["line_chart"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def line_chart(title: str, x: np.ndarray, series: dict[str, np.ndarray], *, y_label: str,
               x_label: str = "minutes from now", band: tuple[float | None, float | None] | None = None,
               width: int = 520, height: int = 210) -> str:
    """An inline ``<svg>``: one polyline per series over ``x`` (shape (n,)), an optional shaded target
    band ``(low, high)`` (None = unbounded on that side), axis labels and the y range's end values.
    An empty chart says so instead of drawing axes over nothing."""
    left, right, top, bottom = 58, 10, 22, 34
    pw, ph = width - left - right, height - top - bottom
    x = np.asarray(x, dtype=np.float64)
    finite = [np.asarray(v, dtype=np.float64) for v in series.values()]
    ys = np.concatenate([v[np.isfinite(v)] for v in finite]) if finite else np.zeros(0)
    head = (f'<svg class=chart role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
            f'data-points="{int(ys.size)}"><text x="{left}" y="14" font-size="13" font-weight="bold">'
            f"{html.escape(title)}</text>")
    if x.size == 0 or ys.size == 0:
        return (head + f'<text x="{left + 8}" y="{top + ph / 2}" font-size="12" fill="#777">no data in this '
                "window</text></svg>")
    lo, hi = float(ys.min()), float(ys.max())
    if band is not None:
        lo = min([lo] + [b for b in band if b is not None])
        hi = max([hi] + [b for b in band if b is not None])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    x0, x1 = float(x.min()), float(x.max())
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1.0, x1 + 1.0

    def px(v: np.ndarray) -> np.ndarray:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: np.ndarray) -> np.ndarray:
        return top + (hi - v) / (hi - lo) * ph

    parts = [head, f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    if band is not None:
        b_lo = lo if band[0] is None else band[0]
        b_hi = hi if band[1] is None else band[1]
        y_a, y_b = float(py(np.array(b_hi))), float(py(np.array(b_lo)))
        parts.append(f'<rect class=band x="{left}" y="{y_a:.1f}" width="{pw}" height="{max(y_b - y_a, 0.5):.1f}" '
                     'fill="#2ca02c" fill-opacity="0.12"><title>target band</title></rect>')
    for i, (name, v) in enumerate(series.items()):
        v = np.asarray(v, dtype=np.float64)
        ok = np.isfinite(v)
        if not ok.any():
            continue
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(x[ok]).tolist(), py(v[ok]).tolist(), strict=True))
        color = _COLORS[i % len(_COLORS)]
        parts.append(f'<polyline class=series data-series="{html.escape(name)}" data-x="{_values(x[ok])}" '
                     f'data-y="{_values(v[ok])}" fill="none" stroke="{color}" stroke-width="1.6" points="{pts}">'
                     f"<title>{html.escape(name)}</title></polyline>")
        if ok.sum() == 1:
            cx, cy = float(px(x[ok])[0]), float(py(v[ok])[0])
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{color}"/>')
        parts.append(f'<text x="{left + 6 + 110 * i}" y="{top + 12}" font-size="11" fill="{color}">'
                     f"{html.escape(name)}</text>")
    parts.append(f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{_num(hi)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">{_num(lo)}</text>')
    parts.append(f'<text x="{left}" y="{height - 18}" font-size="10">{_num(x0)}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 18}" font-size="10" text-anchor="end">{_num(x1)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
                 f"{html.escape(x_label)}</text>")
    parts.append(f'<text transform="translate(12,{top + ph / 2}) rotate(-90)" font-size="11" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    return "".join(parts) + "</svg>"


def _values(v: np.ndarray) -> str:
    """Space-separated, round-tripping decimal values (``repr`` of each float)."""
    return " ".join(repr(float(a)) for a in v.tolist())


def _num(v: float) -> str:
    return "0" if v == 0 or not math.isfinite(v) else f"{v:.3g}"
