"""The report's quality section: per model, the distribution of ``clip_score`` and the
share of images the safety checker flagged; and the contact sheet's order by score.

Pure: works on the image rows :mod:`pipeline.output.report` read (their metadata columns).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from pipeline.spec import schema as S

_BINS = 20
_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


@dataclass
class ModelQuality:
    """One model's quality figures: ``scores`` are its images' non-null clip scores;
    ``checked`` the images its safety checker judged, ``flagged`` those it flagged."""

    model: str
    images: int
    scores: list[float]
    checked: int
    flagged: int

    @property
    def flagged_share(self) -> Optional[float]:
        return self.flagged / self.checked if self.checked else None


def by_model(images: list[dict[str, Any]]) -> list[ModelQuality]:
    """Quality figures of each model with images, in name order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in images:
        groups.setdefault(str(row.get(S.MODEL)), []).append(row)
    found = []
    for model, rows in sorted(groups.items()):
        verdicts = [r.get(S.NSFW_DETECTED) for r in rows if r.get(S.NSFW_DETECTED) is not None]
        scores = [r[S.CLIP_SCORE] for r in rows if r.get(S.CLIP_SCORE) is not None]
        found.append(ModelQuality(model, len(rows), scores, len(verdicts), sum(verdicts)))
    return found


def lowest_scores(images: list[dict[str, Any]], k: int) -> list[int]:
    """Indices of up to ``k`` scored images, lowest ``clip_score`` first (ties in input
    order): where a dataset's failures are."""
    scored = [i for i, row in enumerate(images) if row.get(S.CLIP_SCORE) is not None]
    return sorted(scored, key=lambda i: images[i][S.CLIP_SCORE])[:k]


def quality_section(images: list[dict[str, Any]]) -> str:
    """The report's HTML section: a table per model (images, scored, clip_score
    quantiles, flagged share) and a histogram of each model's scores."""
    e = html.escape
    figures = by_model(images)
    if not any(q.scores or q.checked for q in figures):
        return (
            "<h2>Quality</h2><p>No image has a clip_score or a safety verdict: add a <code>scoring</code> section to score "
            "images, and a model with a safety checker records <code>nsfw_detected</code>.</p>"
        )
    rows, charts = [], []
    for q in figures:
        if q.scores:
            values = np.quantile(np.array(q.scores), _QUANTILES)
            spread = "".join(f"<td class=n>{v:.2f}</td>" for v in values) + f"<td class=n>{np.mean(q.scores):.2f}</td>"
            charts.append(histogram(q.scores, f"clip_score of {q.model} ({len(q.scores)} images)"))
        else:
            spread = "<td colspan=6>not scored</td>"
        share = f"{q.flagged} of {q.checked} ({q.flagged_share:.1%})" if q.checked else "no checker run"
        rows.append(f"<tr><td>{e(q.model)}</td><td class=n>{q.images}</td><td class=n>{len(q.scores)}</td>{spread}<td>{share}</td></tr>")
    return (
        "<h2>Quality</h2><p class=meta>clip_score is 100 x the cosine of the CLIP embeddings of each image and its prompt; "
        "flagged counts the images the model's safety checker flagged among those it judged (nsfw_detected not null).</p>"
        "<table><tr><th>model</th><th>images</th><th>scored</th><th>min</th><th>p10</th><th>median</th><th>p90</th><th>max</th>"
        "<th>mean</th><th>flagged by the safety checker</th></tr>" + "".join(rows) + "</table>" + "".join(charts)
    )


def histogram(values: list[float], title: str) -> str:
    """Inline SVG bars: how many values fall in each of :data:`_BINS` equal bins."""
    e = html.escape
    counts, edges = np.histogram(np.array(values), bins=_BINS)
    width, height, left, bottom, top = 520, 150, 40, 24, 22
    bar = (width - left - 10) / _BINS
    peak = max(int(counts.max()), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<text x="{left}" y="15" font-size="12" font-weight="600">{e(title)}</text>',
    ]
    for i, n in enumerate(counts):
        h = (height - top - bottom) * n / peak
        x = left + i * bar
        parts.append(
            f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="#1f77b4">'
            f"<title>{edges[i]:.2f} to {edges[i + 1]:.2f}: {n}</title></rect>"
        )
    for x, label in ((left, edges[0]), (width - 10, edges[-1])):
        parts.append(f'<text x="{x}" y="{height - 8}" font-size="11" text-anchor="middle">{label:.1f}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" font-size="11" text-anchor="end">{peak}</text></svg>')
    return "".join(parts)
