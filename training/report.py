"""A training run's curves and diagnostics: as chart data (`run_report`) and as one HTML page (`render_report`).

Reads `<run_dir>/metrics.jsonl` into panels: the loss and learning rate per step,
dev vs train-subset nDCG@10 and their gap (overfitting), per-dimension std and mean
pairwise cosine (collapse), masked false negatives and negatives scored above the
positive (false-negative saturation), low vs high lexical overlap nDCG@10 and their
gap, and the STS-B probe (shortcut learning), query vs document norms and their ratio
(drift). Each panel carries the thresholds its alert fires at (the run's recipe
`[diagnostics]`), the alerts that fired and the remedy. The web console draws the
same data that `render_report` plots with matplotlib into a self-contained page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from training.diagnostics import REMEDIES, Thresholds, collapse_bounds, saturation_bound
from training.errors import InvalidInput
from training.metrics_log import read_log

REPORT_FILE = "report.html"
RECIPE_FILE = "recipe.json"

@dataclass(frozen=True)
class _Line:
    label: str
    kind: str
    value: Callable[[dict], float | None]


@dataclass(frozen=True)
class _PanelSpec:
    key: str
    title: str
    caption: str
    mode: str | None
    lines: tuple[_Line, ...]
    thresholds: Callable[[Thresholds, dict], list[tuple[float, str]]] = lambda t, base: []


@dataclass(frozen=True)
class Series:
    """One curve: `(step, value)` points."""

    label: str
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class ThresholdLine:
    """A horizontal line where the panel's alert fires."""

    value: float
    label: str


@dataclass(frozen=True)
class Panel:
    """One chart: its curves, the thresholds drawn on it, and, for a failure mode, its alerts and remedy."""

    key: str
    title: str
    caption: str
    mode: str | None
    series: list[Series]
    thresholds: list[ThresholdLine]
    fired: bool
    alerts: list[str]
    remedy: str | None


@dataclass(frozen=True)
class RunReport:
    """Everything the report shows about one run, as plain data."""

    records: int
    thresholds: dict
    panels: list[Panel]
    stages: list[dict]
    alerts: list[dict]
    events: list[dict]
    summary: dict | None


def _field(key: str) -> Callable[[dict], float | None]:
    return lambda record: record.get(key)


def _difference(minuend: str, subtrahend: str) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        a, b = record.get(minuend), record.get(subtrahend)
        return a - b if a is not None and b is not None else None

    return value


def _ratio(numerator: str, denominator: str) -> Callable[[dict], float | None]:
    def value(record: dict) -> float | None:
        a, b = record.get(numerator), record.get(denominator)
        return a / b if a is not None and b else None

    return value


def _overlap_gap_limit(t: Thresholds, base: dict) -> list[tuple[float, str]]:
    base_gap = _difference("ndcg@10_high_overlap", "ndcg@10_low_overlap")(base)
    return [] if base_gap is None else [(base_gap + t.shortcut_max_overlap_gap, "gap threshold (base gap + max)")]


def _overfit_gap_limit(t: Thresholds, base: dict) -> list[tuple[float, str]]:
    base_gap = _difference("ndcg@10_train", "ndcg@10")(base)
    return [((base_gap or 0.0) + t.overfit_max_gap, "gap threshold (base gap + max)")]


def _norm_ratio_band(t: Thresholds, base: dict) -> list[tuple[float, str]]:
    ratio = _ratio("query_norm_mean", "doc_norm_mean")(base)
    if not ratio:
        return []
    change = t.drift_max_norm_ratio_change
    return [(ratio * (1 + change), "drift threshold (upper)"), (ratio / (1 + change), "drift threshold (lower)")]


_PANELS = (
    _PanelSpec("loss", "Loss", "Training loss", None, (_Line("loss", "step", _field("loss")),)),
    _PanelSpec("lr", "Learning rate", "Learning rate (warmup, cosine decay)", None, (_Line("lr", "step", _field("lr")),)),
    _PanelSpec(
        "overfitting", "Overfitting", "nDCG@10: dev vs train subset, and the gap", "overfitting",
        (_Line("dev", "eval", _field("ndcg@10")), _Line("train subset", "eval", _field("ndcg@10_train")),
         _Line("train - dev", "eval", _difference("ndcg@10_train", "ndcg@10"))),
        _overfit_gap_limit,
    ),
    _PanelSpec(
        "collapse_std", "Collapse", "Per-dimension std of unit embeddings", "collapse",
        (_Line("training batch", "step", _field("batch_dim_std")), _Line("dev probe", "eval", _field("mean_dim_std"))),
        lambda t, base: [(collapse_bounds(t, base)[0], "collapse threshold")],
    ),
    _PanelSpec(
        "collapse_cosine", "Collapse (cosine)", "Mean pairwise cosine", "collapse",
        (_Line("training batch", "step", _field("batch_mean_cosine")),
         _Line("dev probe", "eval", _field("mean_pairwise_cosine"))),
        lambda t, base: [(collapse_bounds(t, base)[1], "collapse threshold")],
    ),
    _PanelSpec(
        "masked", "False negatives", "Masked false negatives per batch", "false_negatives",
        (_Line("masked", "step", _field("masked")),),
    ),
    _PanelSpec(
        "negatives_above_positive", "False negatives (scores)", "Share of negatives scored >= positive: training batches, dev pairs",
        "false_negatives", (_Line("training batch", "step", _field("negatives_above_positive")),
                            _Line("dev", "eval", _field("negatives_above_positive"))),
        lambda t, base: [(saturation_bound(t, base), "saturation threshold (base share + max)")],
    ),
    _PanelSpec(
        "shortcut", "Shortcut learning", "nDCG@10 by lexical overlap with the positive, and the gap", "shortcut",
        (_Line("low overlap", "eval", _field("ndcg@10_low_overlap")),
         _Line("high overlap", "eval", _field("ndcg@10_high_overlap")),
         _Line("high - low", "eval", _difference("ndcg@10_high_overlap", "ndcg@10_low_overlap"))),
        _overlap_gap_limit,
    ),
    _PanelSpec(
        "sts", "Out-of-domain probe", "STS-B Spearman", "shortcut", (_Line("STS-B", "eval", _field("sts_spearman")),),
        lambda t, base: [] if base.get("sts_spearman") is None else [(base["sts_spearman"] - t.sts_max_drop, "probe threshold")],
    ),
    _PanelSpec(
        "drift", "Drift", "Norms before normalisation", "drift",
        (_Line("queries", "eval", _field("query_norm_mean")), _Line("documents", "eval", _field("doc_norm_mean"))),
    ),
    _PanelSpec(
        "drift_ratio", "Drift (ratio)", "Query/document norm ratio", "drift",
        (_Line("query / document", "eval", _ratio("query_norm_mean", "doc_norm_mean")),),
        _norm_ratio_band,
    ),
)


def _thin(points: list[tuple[float, float]], max_points: int | None) -> list[tuple[float, float]]:
    """Every n-th point (and the last) so a long run stays a light chart."""
    if max_points is None or len(points) <= max_points:
        return points
    stride = math.ceil(len(points) / max_points)
    thinned = points[::stride]
    return thinned if thinned[-1] == points[-1] else thinned + [points[-1]]


def _series(records: list[dict], line: _Line, max_points: int | None) -> Series:
    points = []
    for record in records:
        if record["type"] == line.kind and (value := line.value(record)) is not None:
            points.append((record.get("global_step", record.get("step", 0)), value))
    return Series(line.label, _thin(points, max_points))


def run_thresholds(run_dir: str | Path) -> Thresholds:
    """The thresholds the run's alerts fired at: its recipe's `[diagnostics]` (defaults if it recorded none)."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return Thresholds()
    return Thresholds(**json.loads(path.read_text(encoding="utf-8")).get("diagnostics", {}))


def _event_text(record: dict) -> str | None:
    kind = record["type"]
    if kind == "stage_start":
        return f"stage {record['stage']} started: {record.get('steps')} steps over {record.get('examples')} examples"
    if kind == "eval":
        where = "base model" if record.get("stage") == "base" else f"stage {record.get('stage')} step {record.get('step')}"
        return f"{where}: dev nDCG@10 {record.get('ndcg@10') or 0:.4f}"
    if kind == "mining":
        return f"stage {record.get('stage')}: mined negatives, kept {record.get('kept')} of {record.get('candidates')} candidates"
    if kind == "alert":
        return f"alert {record['mode']} (stage {record.get('stage')}, step {record.get('step')}): {record['message']}"
    if kind == "stage":
        outcome = "rolled back (no dev gain)" if record.get("gated") else f"kept, best at step {record.get('best_step')}"
        return f"stage {record['name']} ended after {record.get('steps')} steps: {outcome}"
    if kind == "summary":
        return (f"run finished: dev nDCG@10 {record['base'].get('ndcg@10', 0):.4f} -> "
                f"{record['final'].get('ndcg@10', 0):.4f} on {record.get('dev_queries')} dev queries")
    return None


def run_report(run_dir: str | Path, thresholds: Thresholds | None = None, max_points: int | None = None) -> RunReport:
    """The run's panels, stages, alerts and event log so far (a run still training gives what it has logged).

    `thresholds` default to the run's recipe's; `max_points` thins each curve to about that many points.
    """
    return _report(read_log(run_dir), thresholds or run_thresholds(run_dir), max_points)


def _report(records: list[dict], t: Thresholds, max_points: int | None) -> RunReport:
    base = next((r for r in records if r["type"] == "eval" and r.get("stage") == "base"), {})
    alerts = [r for r in records if r["type"] == "alert"]
    panels = []
    for spec in _PANELS:
        fired = [f"{a['message']} (stage {a.get('stage')}, step {a.get('step')})" for a in alerts if a["mode"] == spec.mode]
        panels.append(Panel(
            spec.key, spec.title, spec.caption, spec.mode,
            [_series(records, line, max_points) for line in spec.lines],
            [ThresholdLine(value, label) for value, label in spec.thresholds(t, base)],
            bool(fired), fired, REMEDIES[spec.mode] if spec.mode else None,
        ))
    events = [{"time": r.get("time"), "type": r["type"], "text": text} for r in records if (text := _event_text(r))]
    return RunReport(
        records=len(records), thresholds=asdict(t), panels=panels,
        stages=[r for r in records if r["type"] == "stage"], alerts=alerts, events=events,
        summary=next((r for r in reversed(records) if r["type"] == "summary"), None),
    )


def _png(panel: Panel) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [series for series in panel.series if series.points]
    if not drawn:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.2))
    for series in drawn:
        xs, ys = zip(*series.points)
        axis.plot(xs, ys, marker="o" if len(xs) < 50 else None, markersize=3, label=series.label)
    for line in panel.thresholds:
        axis.axhline(line.value, color="crimson", linestyle="--", linewidth=1, label=line.label)
    axis.set_title(panel.caption)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def render_report(run_dir: str | Path, thresholds: Thresholds | None = None) -> Path:
    """Write `<run_dir>/report.html` and return its path."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    if not records:
        raise InvalidInput(f"{run_dir}: no metrics.jsonl here; pass the run directory `lockstep train` wrote")
    report = _report(records, thresholds or run_thresholds(run_dir), None)
    summary = report.summary
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Training report: {html.escape(run_dir.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;color:#1b1b1b}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1rem}"
        "img{max-width:100%}.alert{background:#fff3f0;border-left:4px solid #c0392b;padding:.5rem 1rem;margin:.5rem 0}</style></head><body>",
        f"<h1>Training report: {html.escape(run_dir.name)}</h1>",
    ]
    if summary:
        parts.append(
            f"<p>Dev nDCG@10: base <strong>{summary['base'].get('ndcg@10', 0):.4f}</strong> &rarr; final "
            f"<strong>{summary['final'].get('ndcg@10', 0):.4f}</strong> on {summary.get('dev_queries')} dev queries; "
            f"{summary.get('train_examples')} training pairs; precision {html.escape(str(summary.get('precision')))}.</p>"
        )
    if report.stages:
        parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>steps</th><th>best step</th><th>dev nDCG@10</th><th>outcome</th></tr>")
        for s in report.stages:
            outcome = "rolled back (no dev gain)" if s.get("gated") else ("stopped early" if s.get("stopped_early") else "kept")
            parts.append(f"<tr><td>{html.escape(s['name'])}</td><td>{s['steps']}</td><td>{s['best_step']}</td><td>{(s.get('ndcg@10') or 0):.4f}</td><td>{outcome}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Alerts</h2>")
    if report.alerts:
        for a in report.alerts:
            parts.append(f"<div class='alert'><strong>{html.escape(a['mode'])}</strong> (stage {html.escape(str(a.get('stage')))}, step {a.get('step')}): "
                         f"{html.escape(a['message'])}<br>Remedy: {html.escape(a['remedy'])}</div>")
    else:
        parts.append("<p>No failure-mode signal crossed its threshold.</p>")
    parts.append("<h2>Curves</h2><div class='grid'>")
    for panel in report.panels:
        if png := _png(panel):
            parts.append(f"<figure><img alt='{html.escape(panel.caption)}' src='data:image/png;base64,{png}'><figcaption>{html.escape(panel.title)}</figcaption></figure>")
    parts.append("</div><h2>Remedies by failure mode</h2><ul>")
    parts.extend(f"<li><strong>{html.escape(mode)}</strong>: {html.escape(text)}</li>" for mode, text in REMEDIES.items())
    parts.append(f"</ul><details><summary>Last evaluation</summary><pre>{html.escape(json.dumps(next((r for r in reversed(records) if r['type'] == 'eval'), {}), indent=2))}</pre></details>")
    parts.append("</body></html>")
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
