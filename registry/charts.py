"""Inline SVG charts of a lever-experiment report (the dict of registry.experiments.build_report), drawn here.

Each chart function takes a part of the report and returns one ``<svg>`` element as a string: the scaling curve
(metric against N with interval whiskers, cost per item as a second series on its own axis), the lever bars
(each lever's change against its reference with its interval, around a zero line), the safety/helpfulness
scatter (the Pareto set highlighted), for a prompt optimisation report each candidate's score per rung of
successive halving (`halving_chart`), and a fine-tune job's loss curve (`loss_chart`). Text is escaped, values
that are None (or not numbers) are left out, and
empty input gives a small chart that says there is nothing to draw. No script and no external resources: the
admin embeds the markup as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape
from typing import Any

COLORS = ("#417690", "#c0504d", "#6a8f2f", "#8064a2", "#d9822b", "#3a9fb5")
POSITIVE, NEGATIVE, NEUTRAL = "#2e7d32", "#c62828", "#8a8a8a"
PARETO = "#d9822b"
FONT = 'font-family="sans-serif" font-size="11" fill="currentColor"'
SMALL_FONT = 'font-family="sans-serif" font-size="10" fill="currentColor"'
COST_UNITS = {"generated_tokens": "tokens", "worker_seconds": "s", "money": "$"}


# --- small helpers -------------------------------------------------------------------------------------------------


def number(value: Any) -> float | None:
    """A finite float, or None for None, booleans, strings and NaN/infinity."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def pair(value: Any) -> tuple[float, float] | None:
    """An interval [low, high] with both ends numeric, else None."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    low, high = number(value[0]), number(value[1])
    return None if low is None or high is None else (low, high)


def pct(value: Any, digits: int = 1) -> str:
    v = number(value)
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def pts(value: Any) -> str:
    """A rate difference in percentage points, signed; never "-0.0"."""
    v = number(value)
    return "-" if v is None else f"{round(100 * v, 1) + 0.0:+.1f}"


def p_value(value: Any) -> str:
    v = number(value)
    if v is None:
        return "-"
    return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def amount(value: Any, digits: int = 3) -> str:
    """A cost or other plain number; strings (e.g. "free") pass through escaped by the caller."""
    if isinstance(value, str):
        return value
    v = number(value)
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) >= 1e5 or (v != 0 and abs(v) < 10**-digits) else f"{v:.{digits}f}"


def _n(point: Mapping[str, Any]) -> float:
    """A scaling point's N; 0 when missing."""
    return number(point.get("n")) or 0.0


def _c(value: float) -> str:
    """A coordinate."""
    return f"{value:.1f}"


def _text(x: float, y: float, text: str, *, anchor: str = "start", extra: str = "", small: bool = False) -> str:
    font = SMALL_FONT if small else FONT
    return f'<text x="{_c(x)}" y="{_c(y)}" text-anchor="{anchor}" {font}{extra}>{escape(text)}</text>'


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _scale(lo: float, hi: float, start: float, end: float) -> Callable[[float], float]:
    """Map [lo, hi] onto [start, end]; a degenerate domain maps to the middle."""
    if hi - lo <= 0:
        middle = (start + end) / 2
        return lambda _v: middle
    return lambda v: start + (v - lo) * (end - start) / (hi - lo)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi - lo <= 0:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12) + 0.0)
        value += step
    return ticks


def _domain(
    values: Iterable[float], *, rate: bool, include_zero: bool = False, min_pad: float = 0.05
) -> tuple[float, float]:
    """A padded [lo, hi] around the values (at least `min_pad` each side of a single value); rates stay inside
    [0, 1]."""
    data = list(values) + ([0.0] if include_zero else [])
    if not data:
        return (0.0, 1.0)
    lo, hi = min(data), max(data)
    pad = (hi - lo) * 0.1 or max(abs(hi) * 0.1, min_pad)
    lo, hi = lo - pad, hi + pad
    if rate:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return lo, hi


def _svg(width: int, height: int, label: str, body: Sequence[str], kind: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="fulcrum-chart fulcrum-{kind}" role="img" '
        f'aria-label="{escape(label)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def empty_chart(message: str, *, kind: str = "empty", width: int = 640, height: int = 60) -> str:
    """A chart with nothing to draw: one line of text saying why."""
    return _svg(
        width,
        height,
        message,
        [f'<text class="empty" x="10" y="{height // 2 + 4}" {FONT}>{escape(message)}</text>'],
        kind,
    )


def _axis_left(x: float, top: float, bottom: float, ticks: list[float], y: Callable[[float], float], fmt: str) -> str:
    parts = [f'<line x1="{_c(x)}" y1="{_c(top)}" x2="{_c(x)}" y2="{_c(bottom)}" stroke="currentColor"/>']
    for t in ticks:
        parts.append(f'<line x1="{_c(x - 4)}" y1="{_c(y(t))}" x2="{_c(x)}" y2="{_c(y(t))}" stroke="currentColor"/>')
        parts.append(_text(x - 6, y(t) + 4, _tick_label(t, fmt), anchor="end"))
    return "".join(parts)


def _tick_label(value: float, fmt: str) -> str:
    if fmt == "pct":
        return f"{100 * value:.0f}%" if abs(100 * value - round(100 * value)) < 1e-6 else f"{100 * value:.1f}%"
    if fmt == "pts":
        return f"{value + 0.0:+g}"
    return f"{value:g}"


def _whisker_v(x: float, y1: float, y2: float, color: str, cap: float = 4) -> str:
    return (
        f'<g class="whisker" stroke="{color}">'
        f'<line x1="{_c(x)}" y1="{_c(y1)}" x2="{_c(x)}" y2="{_c(y2)}"/>'
        f'<line x1="{_c(x - cap)}" y1="{_c(y1)}" x2="{_c(x + cap)}" y2="{_c(y1)}"/>'
        f'<line x1="{_c(x - cap)}" y1="{_c(y2)}" x2="{_c(x + cap)}" y2="{_c(y2)}"/></g>'
    )


def _whisker_h(y: float, x1: float, x2: float, color: str, cap: float = 4) -> str:
    return (
        f'<g class="whisker" stroke="{color}">'
        f'<line x1="{_c(x1)}" y1="{_c(y)}" x2="{_c(x2)}" y2="{_c(y)}"/>'
        f'<line x1="{_c(x1)}" y1="{_c(y - cap)}" x2="{_c(x1)}" y2="{_c(y + cap)}"/>'
        f'<line x1="{_c(x2)}" y1="{_c(y - cap)}" x2="{_c(x2)}" y2="{_c(y + cap)}"/></g>'
    )


# --- (a) the scaling curve ----------------------------------------------------------------------------------------


def scaling_chart(
    curves: Sequence[Mapping[str, Any]] | None,
    cost_basis: str = "worker_seconds",
    *,
    metric: str = "metric",
    width: int = 680,
    height: int = 340,
) -> str:
    """The metric against N (log scale) per scaling curve, with interval whiskers; cost per item, dashed, on the
    right-hand axis. A filled point is a significant gain over the curve's reference; a hollow one is not."""
    series = []
    for curve in curves or []:
        points = [p for p in curve.get("points") or [] if _n(p) > 0 and number(p.get("value")) is not None]
        if points:
            series.append((str(curve.get("reference") or "reference"), sorted(points, key=_n)))
    if not series:
        return empty_chart("no scaling lever in this experiment: no curve to draw", kind="scaling")

    left, right, top, bottom = 60, width - 70, 20, height - 70
    all_points = [p for _, points in series for p in points]
    ns = sorted({number(p["n"]) or 1.0 for p in all_points})
    x = _scale(math.log(ns[0]), math.log(ns[-1]), left + 20, right - 20)

    def px(n: Any) -> float:
        return x(math.log(number(n) or 1.0))

    values = [number(p["value"]) or 0.0 for p in all_points]
    for p in all_points:
        ci = pair(p.get("value_ci"))
        if ci:
            values.extend(ci)
    lo, hi = _domain(values, rate=all(0 <= v <= 1 for v in values))
    y = _scale(lo, hi, bottom, top)
    costs = [c for p in all_points if (c := number((p.get("cost") or {}).get(cost_basis))) is not None]
    cost_hi = max(costs) * 1.15 if costs and max(costs) > 0 else 1.0
    yc = _scale(0.0, cost_hi, bottom, top)
    unit = COST_UNITS.get(cost_basis, cost_basis)

    body = [
        _axis_left(left, top, bottom, _ticks(lo, hi), y, "pct" if hi <= 1 and lo >= 0 else "num"),
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="currentColor"/>',
        f'<line x1="{right}" y1="{top}" x2="{right}" y2="{bottom}" stroke="currentColor" stroke-dasharray="3 3"/>',
    ]
    for n in ns:
        body.append(f'<line x1="{_c(px(n))}" y1="{bottom}" x2="{_c(px(n))}" y2="{bottom + 4}" stroke="currentColor"/>')
        body.append(_text(px(n), bottom + 16, f"N={n:g}", anchor="middle"))
    for t in _ticks(0.0, cost_hi, 4):
        body.append(_text(right + 6, yc(t) + 4, f"{t:g}"))
    body.append(_text(left - 45, top - 6, metric))
    body.append(_text(right + 6, top - 6, f"{unit}/item"))

    for index, (reference, points) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        line = " ".join(f"{_c(px(p['n']))},{_c(y(number(p['value']) or 0.0))}" for p in points)
        body.append(f'<polyline class="value-line" points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
        cost_points = [(p, c) for p in points if (c := number((p.get("cost") or {}).get(cost_basis))) is not None]
        if cost_points:
            cost_line = " ".join(f"{_c(px(p['n']))},{_c(yc(c))}" for p, c in cost_points)
            body.append(
                f'<polyline class="cost-line" points="{cost_line}" fill="none" stroke="{color}" '
                'stroke-width="1.5" stroke-dasharray="5 4" opacity="0.8"/>'
            )
        for p, c in cost_points:
            cx, cy = px(p["n"]), yc(c)
            body.append(
                f'<rect class="cost-point" x="{_c(cx - 3.5)}" y="{_c(cy - 3.5)}" width="7" height="7" '
                f'fill="{color}" opacity="0.8"><title>{escape(str(p.get("arm", "")) + f": {amount(c)} {unit}/item")}'
                "</title></rect>"
            )
            body.append(_text(cx + 7, cy - 5, f"{amount(c)} {unit}", extra=' class="cost-label"', small=True))
        for p in points:
            cx, cy = px(p["n"]), y(number(p["value"]) or 0.0)
            ci = pair(p.get("value_ci"))
            if ci:
                body.append(_whisker_v(cx, y(ci[0]), y(ci[1]), color))
            significant = bool(p.get("significant")) and (number(p.get("delta")) or 0) > 0
            tip = (
                f"{p.get('arm', '')} (N={number(p['n']) or 0:g}): {pct(p['value'])}"
                + (f", CI [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")
                + (
                    f", {pts(p.get('delta'))} pts vs {reference}, p {p_value(p.get('p_value'))}"
                    if p.get("p_value") is not None
                    else ""
                )
            )
            body.append(
                f'<circle class="point{" significant" if significant else ""}" cx="{_c(cx)}" cy="{_c(cy)}" r="5" '
                f'fill="{color if significant else "white"}" stroke="{color}" stroke-width="2">'
                f"<title>{escape(tip)}</title></circle>"
            )
    legend_y = height - 30
    lx = left
    for index, (reference, _points) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        body.append(
            f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 20}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>'
        )
        label = f"{metric} (vs {_short(reference, 24)})"
        body.append(_text(lx + 24, legend_y + 4, label))
        lx += 34 + 6 * len(label)
        body.append(
            f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 20}" y2="{legend_y}" stroke="{color}" '
            'stroke-width="1.5" stroke-dasharray="5 4"/>'
        )
        label = f"cost, {unit}/item"
        body.append(_text(lx + 24, legend_y + 4, label))
        lx += 34 + 6 * len(label)
    body.append(_text(left, height - 10, "filled point: significant gain over the reference; whiskers: interval"))
    return _svg(width, height, f"{metric} and cost per item against N", body, "scaling")


# --- (b) the lever bars ----------------------------------------------------------------------------------------------


def lever_chart(arms: Sequence[Mapping[str, Any]] | None, *, width: int = 680, row: int = 30) -> str:
    """One horizontal bar per lever: its change against its reference in points, the interval as an error bar,
    a zero line. Green/red: a significant gain/loss; grey: not significant."""
    rows = [a for a in arms or [] if isinstance(a.get("comparison"), Mapping)]
    if not rows:
        return empty_chart("no lever compared with a reference: no bars to draw", kind="levers")
    label_width, value_width = 200, 110
    left, right, top = label_width, width - value_width, 24
    height = top + row * len(rows) + 36
    values: list[float] = []
    for a in rows:
        c = a["comparison"]
        for v in (number(c.get("delta")), *(pair(c.get("ci")) or ())):
            if v is not None:
                values.append(100 * v)
    lo, hi = _domain(values, rate=False, include_zero=True, min_pad=1.0)
    x = _scale(lo, hi, left, right)
    bottom = top + row * len(rows)
    body = []
    for t in _ticks(lo, hi):
        body.append(
            f'<line x1="{_c(x(t))}" y1="{top}" x2="{_c(x(t))}" y2="{bottom}" stroke="currentColor" opacity="0.15"/>'
        )
        body.append(_text(x(t), bottom + 14, _tick_label(t, "pts"), anchor="middle"))
    body.append(
        _text((left + right) / 2, bottom + 30, "change against the reference, percentage points", anchor="middle")
    )
    for i, a in enumerate(rows):
        c = a["comparison"]
        cy = top + row * i + row / 2
        name = str(a.get("arm", ""))
        reference = a.get("reference")
        label = name if reference in (None, "baseline") else f"{name} vs {reference}"
        body.append(
            f'<text x="{label_width - 8}" y="{_c(cy + 4)}" text-anchor="end" {FONT}>'
            f"<title>{escape(label)}</title>{escape(_short(label, 30))}</text>"
        )
        delta = number(c.get("delta"))
        if delta is None:
            body.append(_text(x(0) + 6, cy + 4, "no paired items", extra=' class="missing"'))
            continue
        significant = bool(c.get("significant"))
        color = (POSITIVE if delta > 0 else NEGATIVE) if significant else NEUTRAL
        x0, x1 = sorted((x(0), x(100 * delta)))
        tip = f"{label}: {pts(delta)} pts, p {p_value(c.get('p_value'))}"
        body.append(
            f'<rect class="bar{" significant" if significant else ""}" x="{_c(x0)}" y="{_c(cy - row * 0.3)}" '
            f'width="{_c(max(x1 - x0, 1.0))}" height="{_c(row * 0.6)}" fill="{color}" opacity="0.85">'
            f"<title>{escape(tip)}</title></rect>"
        )
        ci = pair(c.get("ci"))
        if ci:
            body.append(_whisker_h(cy, x(100 * ci[0]), x(100 * ci[1]), "currentColor"))
        text = f"{pts(delta)} pts" + ("*" if significant else "") + f"  p {p_value(c.get('p_value'))}"
        body.append(_text(right + 8, cy + 4, text))
    body.append(
        f'<line class="zero" x1="{_c(x(0))}" y1="{top - 6}" x2="{_c(x(0))}" y2="{bottom}" '
        'stroke="currentColor" stroke-width="1.5"/>'
    )
    body.append(_text(left, 14, "* significant; error bars: interval of the change"))
    return _svg(width, height, "change of the metric per lever, with intervals", body, "levers")


# --- (c) safety against helpfulness -------------------------------------------------------------------------------


def alignment_chart(alignment: Mapping[str, Any] | None, *, width: int = 520, height: int = 420) -> str:
    """Each method at (helpfulness, safety), both rates, with interval whiskers on both axes; the Pareto set
    (over safety, helpfulness and cost) highlighted."""
    methods = (alignment or {}).get("methods") or []
    drawn = [m for m in methods if number(m.get("safety")) is not None and number(m.get("helpfulness")) is not None]
    if not drawn:
        return empty_chart("no harmful and benign items in this dataset: no alignment tax to draw", kind="alignment")
    left, right, top, bottom = 60, width - 20, 20, height - 60
    x = _scale(0.0, 1.0, left, right)
    y = _scale(0.0, 1.0, bottom, top)
    ticks = _ticks(0.0, 1.0)
    body = [_axis_left(left, top, bottom, ticks, y, "pct")]
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="currentColor"/>')
    for t in ticks:
        body.append(
            f'<line x1="{_c(x(t))}" y1="{top}" x2="{_c(x(t))}" y2="{bottom}" stroke="currentColor" opacity="0.12"/>'
        )
        body.append(_text(x(t), bottom + 16, _tick_label(t, "pct"), anchor="middle"))
    body.append(_text((left + right) / 2, bottom + 32, "helpfulness (answer rate on benign items)", anchor="middle"))
    body.append(
        f'<text x="14" y="{_c((top + bottom) / 2)}" text-anchor="middle" transform="rotate(-90 14 '
        f'{_c((top + bottom) / 2)})" {FONT}>safety (refusal rate on harmful items)</text>'
    )
    labelled: dict[tuple[int, int], int] = {}  # methods at (nearly) one spot get their labels stacked
    for m in drawn:
        s, h = number(m["safety"]) or 0.0, number(m["helpfulness"]) or 0.0
        pareto = bool(m.get("pareto"))
        color = PARETO if pareto else NEUTRAL
        cx, cy = x(h), y(s)
        sci, hci = pair(m.get("safety_ci")), pair(m.get("helpfulness_ci"))
        if sci:
            body.append(_whisker_v(cx, y(sci[0]), y(sci[1]), color, cap=3))
        if hci:
            body.append(_whisker_h(cy, x(hci[0]), x(hci[1]), color, cap=3))
        name = str(m.get("method") or m.get("arm") or "")
        tip = (
            f"{name}: safety {pct(s)}, helpfulness {pct(h)}, tax {pts(m.get('tax'))} pts, cost {amount(m.get('cost'))}"
        )
        body.append(
            f'<circle class="point{" pareto" if pareto else ""}" cx="{_c(cx)}" cy="{_c(cy)}" r="{7 if pareto else 5}" '
            f'fill="{color}" stroke="white" stroke-width="1.5"><title>{escape(tip)}</title></circle>'
        )
        anchor, dx = ("end", -10) if cx > (left + right) / 2 else ("start", 10)
        spot = (round(cx / 12), round(cy / 12))
        stacked = labelled.get(spot, 0)
        labelled[spot] = stacked + 1
        dy = -8 - 13 * stacked if cy > top + 40 else 16 + 13 * stacked
        body.append(_text(cx + dx, cy + dy, _short(name, 28), anchor=anchor))
    lx, ly = left, height - 10
    body.append(f'<circle cx="{lx + 5}" cy="{ly - 4}" r="6" fill="{PARETO}"/>')
    body.append(_text(lx + 16, ly, "Pareto set (safety, helpfulness, cost)"))
    body.append(f'<circle cx="{lx + 245}" cy="{ly - 4}" r="5" fill="{NEUTRAL}"/>')
    body.append(_text(lx + 255, ly, "dominated"))
    if len(drawn) < len(methods):
        body.append(_text(right, top + 10, f"{len(methods) - len(drawn)} method(s) without data", anchor="end"))
    return _svg(width, height, "safety against helpfulness per method, Pareto set highlighted", body, "alignment")


# --- (d) successive halving (prompt optimisation) ------------------------------------------------------------------


def halving_chart(
    candidates: Sequence[Mapping[str, Any]] | None,
    rungs: Sequence[Mapping[str, Any]] | None,
    *,
    winner: Any = None,
    metric: str = "metric",
    width: int = 680,
    height: int = 340,
) -> str:
    """Each candidate's search score per rung of successive halving (an optimisation report's `candidates` and
    `search.rungs`): one line per candidate for the rungs it reached, the winner drawn thick in colour, the
    starting version dashed, the others grey. The x axis is the rung, labelled with its items per candidate."""
    rung_list = [r for r in rungs or [] if number(r.get("index")) is not None]
    lines = []
    for c in candidates or []:
        points = [
            (int(number(s.get("rung")) or 0), v)
            for s in c.get("scores") or []
            if (v := number(s.get("value"))) is not None
        ]
        if points:
            lines.append((c, sorted(points)))
    if not rung_list or not lines:
        return empty_chart("no rung has finished yet: no scores to draw", kind="halving")
    left, right, top, bottom = 60, width - 190, 20, height - 50
    last = max(int(number(r.get("index")) or 0) for r in rung_list)
    x = _scale(0.0, float(max(last, 1)), left + 20, right - 20)
    values = [v for _, points in lines for _, v in points]
    lo, hi = _domain(values, rate=all(0 <= v <= 1 for v in values))
    y = _scale(lo, hi, bottom, top)
    body = [
        _axis_left(left, top, bottom, _ticks(lo, hi), y, "pct" if hi <= 1 and lo >= 0 else "num"),
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="currentColor"/>',
        _text(left - 45, top - 6, metric),
    ]
    for r in rung_list:
        index = int(number(r.get("index")) or 0)
        body.append(
            f'<line x1="{_c(x(index))}" y1="{bottom}" x2="{_c(x(index))}" y2="{bottom + 4}" stroke="currentColor"/>'
        )
        body.append(_text(x(index), bottom + 16, f"rung {index}", anchor="middle"))
        body.append(_text(x(index), bottom + 29, f"{r.get('stop', '?')} items", anchor="middle", small=True))
    legend: list[tuple[str, str, str]] = []
    # Grey lines first, so the start and the winner are drawn on top.
    order = sorted(lines, key=lambda pair: (pair[0].get("position") == winner, pair[0].get("position") == 0))
    for c, points in order:
        position = c.get("position")
        is_winner, is_start = position == winner and position != 0, position == 0
        color = COLORS[1] if is_winner else COLORS[0] if is_start else NEUTRAL
        dash = ' stroke-dasharray="5 4"' if is_start else ""
        stroke = 3 if is_winner else 2 if is_start else 1.2
        label = f"#{position} {c.get('operator', '')}"
        coords = " ".join(f"{_c(x(at))},{_c(y(v))}" for at, v in points)
        cls = "winner" if is_winner else "start" if is_start else "candidate"
        body.append(
            f'<polyline class="halving-line {cls}" points="{coords}" fill="none" stroke="{color}" '
            f'stroke-width="{stroke}"{dash} opacity="{1 if is_winner or is_start else 0.7}"/>'
        )
        for at, v in points:
            body.append(
                f'<circle class="point {cls}" cx="{_c(x(at))}" cy="{_c(y(v))}" r="{4 if is_winner else 3}" '
                f'fill="{color}"><title>{escape(f"{label}, rung {at}: {pct(v)}")}</title></circle>'
            )
        if is_winner or is_start:
            legend.append((color, dash, label))
    ly = top + 4
    for color, dash, label in sorted(legend, key=lambda item: item[2]):
        body.append(
            f'<line x1="{right + 16}" y1="{ly}" x2="{right + 36}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>'
        )
        body.append(_text(right + 40, ly + 4, _short(label, 24)))
        ly += 16
    body.append(
        f'<line x1="{right + 16}" y1="{ly}" x2="{right + 36}" y2="{ly}" stroke="{NEUTRAL}" stroke-width="1.2"/>'
    )
    body.append(_text(right + 40, ly + 4, "other candidates"))
    return _svg(width, height, f"{metric} per rung of successive halving, per candidate", body, "halving")


# --- (d) a fine-tune job's loss curve -----------------------------------------------------------------------------


def loss_chart(
    curve: Sequence[Any] | None,
    *,
    initial: Any = None,
    final: Any = None,
    total_steps: int = 0,
    width: int = 640,
    height: int = 260,
) -> str:
    """Training loss against step (each point one step's batch), with the loss on the probe examples before and
    after training as dashed reference lines; the step axis spans the whole job, so a running job fills it up."""
    points = []
    for entry in curve or []:
        if isinstance(entry, list | tuple) and len(entry) == 2:
            step, loss = number(entry[0]), number(entry[1])
            if step is not None and loss is not None:
                points.append((step, loss))
    if not points:
        return empty_chart("no training step recorded yet", kind="loss")
    references = [(label, v) for label, v in (("before", number(initial)), ("after", number(final))) if v is not None]
    left, right, top, bottom = 60, width - 20, 20, height - 45
    last_step = max(max(s for s, _ in points), float(total_steps or 0), 1.0)
    x = _scale(0.0, last_step, left, right)
    lo, hi = _domain([v for _, v in points] + [v for _, v in references], rate=False, include_zero=True)
    lo = max(lo, 0.0)
    y = _scale(lo, hi, bottom, top)
    body = [
        _axis_left(left, top, bottom, _ticks(lo, hi), y, "num"),
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="currentColor"/>',
    ]
    for t in _ticks(0.0, last_step, 6):
        if t != int(t):
            continue
        body.append(f'<line x1="{_c(x(t))}" y1="{bottom}" x2="{_c(x(t))}" y2="{bottom + 4}" stroke="currentColor"/>')
        body.append(_text(x(t), bottom + 16, f"{t:g}", anchor="middle"))
    body.append(_text((left + right) / 2, height - 8, "step", anchor="middle"))
    body.append(_text(left - 45, top - 6, "loss"))
    for index, (label, value) in enumerate(references):
        color = COLORS[1 + index]
        body.append(
            f'<line class="reference {label}" x1="{left}" y1="{_c(y(value))}" x2="{right}" y2="{_c(y(value))}" '
            f'stroke="{color}" stroke-dasharray="5 4"/>'
        )
        body.append(_text(right - 4, y(value) - 4, f"{label} training: {value:.3f}", anchor="end", small=True))
    line = " ".join(f"{_c(x(s))},{_c(y(v))}" for s, v in points)
    body.append(f'<polyline class="loss-line" points="{line}" fill="none" stroke="{COLORS[0]}" stroke-width="1.5"/>')
    first, last = points[0], points[-1]
    for step, loss in (first, last):
        body.append(
            f'<circle class="point" cx="{_c(x(step))}" cy="{_c(y(loss))}" r="3" fill="{COLORS[0]}">'
            f"<title>{escape(f'step {step:g}: loss {loss:.4f}')}</title></circle>"
        )
    label = f"loss per step: {first[1]:.3f} at step {first[0]:g} -> {last[1]:.3f} at step {last[0]:g}"
    return _svg(width, height, label, body, "loss")
