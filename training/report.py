"""A training run rendered as one self-contained HTML page: curves, diagnostics, alerts and remedies.

Reads `<run_dir>/metrics.jsonl` and draws, with matplotlib, the loss and learning
rate per step, dev vs train-subset nDCG@10 (overfitting), per-dimension std and mean
pairwise cosine (collapse, with thresholds), masked false negatives and negatives
scored above the positive (false-negative saturation), low vs high lexical overlap
nDCG@10 and the STS-B probe (shortcut learning), and query vs document norms (drift).
Plots are embedded as base64 PNGs so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.diagnostics import REMEDIES, Thresholds  # noqa: E402
from training.errors import InvalidInput  # noqa: E402
from training.metrics_log import read_log  # noqa: E402

REPORT_FILE = "report.html"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        if record["type"] == kind and record.get(key) is not None:
            xs.append(record.get("global_step", record.get("step", 0)))
            ys.append(record[key])
    return xs, ys


def _plot(title: str, records: list[dict], lines: list[tuple[str, str, str]], thresholds: list[tuple[float, str]] = ()) -> str | None:
    figure, axis = plt.subplots(figsize=(6.4, 3.2))
    drawn = False
    for kind, key, label in lines:
        xs, ys = _series(records, kind, key)
        if xs:
            axis.plot(xs, ys, marker="o" if kind == "eval" else None, markersize=3, label=label)
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    for value, label in thresholds:
        axis.axhline(value, color="crimson", linestyle="--", linewidth=1, label=label)
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def render_report(run_dir: str | Path, thresholds: Thresholds | None = None) -> Path:
    """Write `<run_dir>/report.html` and return its path."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    if not records:
        raise InvalidInput(f"{run_dir}: no metrics.jsonl here; pass the run directory `lockstep train` wrote")
    t = thresholds or Thresholds()
    plots = [
        ("Loss", _plot("Training loss", records, [("step", "loss", "loss")])),
        ("Learning rate", _plot("Learning rate (warmup, cosine decay)", records, [("step", "lr", "lr")])),
        ("Overfitting", _plot("nDCG@10: dev vs train subset", records, [("eval", "ndcg@10", "dev"), ("eval", "ndcg@10_train", "train subset")])),
        ("Collapse", _plot("Per-dimension std of unit embeddings", records, [("eval", "mean_dim_std", "mean dim std")], [(t.collapse_min_dim_std, "collapse threshold")])),
        ("Collapse (cosine)", _plot("Mean pairwise cosine", records, [("eval", "mean_pairwise_cosine", "mean cosine")], [(t.collapse_max_mean_cosine, "collapse threshold")])),
        ("False negatives", _plot("Masked false negatives per batch", records, [("step", "masked", "masked")])),
        ("False negatives (scores)", _plot("Share of in-batch negatives scored >= positive", records, [("step", "negatives_above_positive", "share")], [(t.saturation_max_negatives_above_positive, "saturation threshold")])),
        ("Shortcut learning", _plot("nDCG@10 by lexical overlap with the positive", records, [("eval", "ndcg@10_low_overlap", "low overlap"), ("eval", "ndcg@10_high_overlap", "high overlap")])),
        ("Out-of-domain probe", _plot("STS-B Spearman", records, [("eval", "sts_spearman", "STS-B")])),
        ("Drift", _plot("Norms before normalisation", records, [("eval", "query_norm_mean", "queries"), ("eval", "doc_norm_mean", "documents")])),
    ]
    summary = next((r for r in reversed(records) if r["type"] == "summary"), None)
    alerts = [r for r in records if r["type"] == "alert"]
    stages = [r for r in records if r["type"] == "stage"]
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
    if stages:
        parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>steps</th><th>best step</th><th>dev nDCG@10</th><th>outcome</th></tr>")
        for s in stages:
            outcome = "rolled back (no dev gain)" if s.get("gated") else ("stopped early" if s.get("stopped_early") else "kept")
            parts.append(f"<tr><td>{html.escape(s['name'])}</td><td>{s['steps']}</td><td>{s['best_step']}</td><td>{(s.get('ndcg@10') or 0):.4f}</td><td>{outcome}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Alerts</h2>")
    if alerts:
        for a in alerts:
            parts.append(f"<div class='alert'><strong>{html.escape(a['mode'])}</strong> (stage {html.escape(str(a.get('stage')))}, step {a.get('step')}): "
                         f"{html.escape(a['message'])}<br>Remedy: {html.escape(a['remedy'])}</div>")
    else:
        parts.append("<p>No failure-mode signal crossed its threshold.</p>")
    parts.append("<h2>Curves</h2><div class='grid'>")
    for title, png in plots:
        if png:
            parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'><figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("</div><h2>Remedies by failure mode</h2><ul>")
    parts.extend(f"<li><strong>{html.escape(mode)}</strong>: {html.escape(text)}</li>" for mode, text in REMEDIES.items())
    parts.append(f"</ul><details><summary>Last evaluation</summary><pre>{html.escape(json.dumps(next((r for r in reversed(records) if r['type'] == 'eval'), {}), indent=2))}</pre></details>")
    parts.append("</body></html>")
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
