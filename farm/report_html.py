"""`farm report`: one self-contained HTML page per job - size vs perplexity delta with the Pareto front,
tokens/s vs task accuracy, the gate's decisions with reasons, and every metric - logged to MLflow beside
the job. Plots are inline SVG drawn by matplotlib; no torch, no network, nothing to fetch when opened."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.report import fmt
from farm.serving import measure as serving


@dataclass(frozen=True)
class Point:
    label: str
    metrics: dict[str, float]
    gate: str = ""
    reasons: str = ""
    warnings: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def pareto(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Labels on the front when both coordinates are to be minimised (size, perplexity delta): no other point
    is at least as good on both and better on one."""
    front = []
    for label, x, y in points:
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for _, x2, y2 in points)
        if not dominated:
            front.append(label)
    return front


def _svg(fig: object) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")  # type: ignore[attr-defined]
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _scatter(
    points: list[Point],
    x: str,
    y: str,
    title: str,
    xlabel: str,
    ylabel: str,
    front: list[str] | None = None,
    plot_id: str = "",
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"promoted": "tab:green", "rejected": "tab:red"}
    have = [p for p in points if x in p.metrics and y in p.metrics]
    for p in have:
        ax.scatter(p.metrics[x], p.metrics[y], s=60, color=colours.get(p.gate, "tab:blue"), zorder=3)
        ax.annotate(p.label, (p.metrics[x], p.metrics[y]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if front:
        f = sorted((p.metrics[x], p.metrics[y]) for p in have if p.label in front)
        ax.plot([a for a, _ in f], [b for _, b in f], "--", color="grey", label="Pareto front", zorder=2)
        ax.legend(fontsize=8)
    if not have:
        ax.text(0.5, 0.5, f"no variant has {x} and {y}", ha="center", transform=ax.transAxes)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    svg = _svg(fig)
    plt.close(fig)
    return f'<figure id="{plot_id}" class="plot">{svg}</figure>'


def _lines(
    series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str, plot_id: str, logx: bool = False
) -> str:
    """One line per variant (and the base): the serving figures across concurrency levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in series.items():
        style: dict[str, Any] = {"color": "black", "linestyle": "--"} if label == "base" else {}
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label, **style)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    svg = _svg(fig)
    plt.close(fig)
    return f'<figure id="{plot_id}" class="plot">{svg}</figure>'


def serving_plots(base: dict[str, float], points: list[Point]) -> list[str]:
    """Per request shape: output tokens/s against concurrency, and TTFT p50 against output tokens/s, one line
    per variant: what the serving engine delivers at each load."""
    who = [("base", base)] + [(p.label, p.metrics) for p in points]
    shapes = sorted({shape for _, m in who for shape in serving.curves(m, "output_tokens_per_s")})
    plots = []
    for shape in shapes:
        speed = {label: serving.curves(m, "output_tokens_per_s").get(shape, []) for label, m in who}
        ttft = {label: dict(serving.curves(m, "ttft_p50_s").get(shape, [])) for label, m in who}
        speed = {label: pts for label, pts in speed.items() if pts}
        plots.append(
            _lines(
                {label: [(float(c), v) for c, v in pts] for label, pts in speed.items()},
                f"Serving throughput ({shape})",
                "concurrent requests",
                "output tokens/s",
                f"plot-serving-throughput-{shape}",
                logx=True,
            )
        )
        lat = {label: [(v, ttft[label][c] * 1e3) for c, v in pts if c in ttft[label]] for label, pts in speed.items()}
        plots.append(
            _lines(
                {k: v for k, v in lat.items() if v},
                f"Serving latency vs throughput ({shape})",
                "output tokens/s",
                "time to first token p50 (ms)",
                f"plot-serving-latency-{shape}",
            )
        )
    return plots


SENSITIVITY = "sensitivity.layer_"


def sensitivity_plot(points: list[Point]) -> list[str]:
    """The per-layer profile of every variant that measured one (mixed precision): the perplexity each decoder
    layer costs rounded alone, so a reader sees which layers were kept high and why."""
    profiles = {
        p.label: sorted((float(k[len(SENSITIVITY) :]), v) for k, v in p.metrics.items() if k.startswith(SENSITIVITY))
        for p in points
    }
    profiles = {label: pts for label, pts in profiles.items() if pts}
    if not profiles:
        return []
    return [
        _lines(
            profiles,
            "Layer sensitivity (each decoder layer rounded alone)",
            "decoder layer",
            "perplexity - base on validation text",
            "plot-sensitivity",
        )
    ]


def render(job: str, base: dict[str, float], points: list[Point]) -> str:
    for p in points:
        p.metrics.setdefault("size_mb", p.metrics.get("weights_bytes", 0) / 1e6)
    sized = [
        (p.label, p.metrics["size_mb"], p.metrics["perplexity_delta"])
        for p in points
        if "perplexity_delta" in p.metrics
    ]
    front = pareto(sized)
    task = next((k for p in points for k in sorted(p.metrics) if k.startswith("task_") and k.endswith("_acc")), None)
    served = sorted(
        {
            n
            for p in points
            for n in p.metrics
            if (parsed := serving.parse_level_name(n)) and parsed[2] == "output_tokens_per_s"
        },
        key=lambda n: serving.parse_level_name(n) or ("", 0, ""),
    )
    speed, speed_label = (
        (served[0], "output tokens/s as served (lowest concurrency)")
        if served
        else ("tokens_per_s_batch1", "tokens/s (batch 1, dense reference)")
    )
    plots = [
        _scatter(
            points,
            "size_mb",
            "perplexity_delta",
            "Size vs perplexity delta",
            "weights (MB)",
            "perplexity - base",
            front,
            "plot-size-ppl",
        ),
        _scatter(
            points,
            speed,
            task or "perplexity_delta",
            "Tokens/s vs " + ("task accuracy" if task else "perplexity delta"),
            speed_label,
            task or "perplexity - base",
            None,
            "plot-speed-quality",
        ),
        *serving_plots(base, points),
        *sensitivity_plot(points),
    ]
    e = html.escape
    gate_rows = "".join(
        f"<tr class='{e(p.gate or 'none')}'><td>{e(p.label)}</td><td>{e(p.gate or '-')}</td>"
        f"<td>{e(p.reasons)}</td><td>{e(p.warnings)}</td><td>{'yes' if p.label in front else ''}</td></tr>"
        for p in points
    )
    keys = sorted({k for p in points for k in p.metrics if not k.startswith("seconds_")})
    metric_rows = "".join(
        f"<tr><td>{e(k)}</td><td>{fmt(base.get(k), '.6g')}</td>"
        + "".join(f"<td>{fmt(p.metrics.get(k), '.6g')}</td>" for p in points)
        + "</tr>"
        for k in keys
    )
    heads = "".join(f"<th>{e(p.label)}</th>" for p in points)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>farm report: {e(job)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}} tr.promoted td{{background:#e6f4ea}}
tr.rejected td{{background:#fce8e6}} .plots{{display:flex;flex-wrap:wrap;gap:1em}} figure{{margin:0}}</style>
</head><body>
<h1>farm report: {e(job)}</h1>
<p>{len(points)} variant(s); green = promoted by the gate, red = rejected; dashed = Pareto front (smaller and
closer to the base's perplexity is better).</p>
<div class="plots">{"".join(plots)}</div>
<h2>Gate</h2>
<table id="gate"><tr><th>variant</th><th>decision</th><th>reasons</th><th>warnings</th><th>Pareto</th></tr>
{gate_rows}</table>
<h2>Metrics</h2>
<table id="metrics"><tr><th>metric</th><th>base</th>{heads}</tr>{metric_rows}</table>
</body></html>
"""
