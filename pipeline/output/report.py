"""``imagegen report``: one self-contained HTML page about an output.

The page holds a contact sheet of a sample of the images (thumbnails embedded as data
URIs, with prompt and parameters; spread evenly over the runs, or the lowest
``clip_score`` first), the quality of each model (``clip_score`` distribution, share
flagged by the safety checker: :mod:`pipeline.output.score_section`), the runs and their counts (from the manifests), a
throughput-over-time chart per run with one line per engine actor (inline SVG), the
error breakdown with examples, and the latest run's spec. It references nothing outside
itself, so it can be mailed, attached to a ticket or opened offline.

Only committed parts (those a manifest lists) are read. The image bytes are read only for
the parts holding a sampled image. Pure: reads through :mod:`pipeline.storage.filesystem`, no Ray.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.output import score_section
from pipeline.spec import schema as S
from pipeline.spec.section import absolute_if_local
from pipeline.storage import commit_protocol, filesystem, record_format

DEFAULT_SAMPLE = 48
THUMBNAIL_PX = 256
MAX_CHARTS = 5  # the newest runs' charts; older runs are in the table
_ROLLING = 8  # images per point of a throughput line
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_MIME = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
_META_COLUMNS = [
    S.REQUEST_ID, S.ID, S.SOURCE, S.ROW_INDEX, S.IMAGE_INDEX, S.PROMPT, S.NEGATIVE_PROMPT, S.SEED, S.WIDTH,
    S.HEIGHT, S.STEPS, S.GUIDANCE_SCALE, S.SCHEDULER, S.MODEL, S.IMAGE_FORMAT, S.GENERATION_SECONDS, S.ACTOR_ID, S.RUN_ID,
    S.NSFW_DETECTED, S.CLIP_SCORE,
]
# How the contact sheet picks its images: spread evenly over the runs, or lowest clip_score first.
ORDERS = ("spread", "score")


@dataclass
class OutputData:
    """What the report shows, read from an output."""

    url: str
    manifests: list[dict[str, Any]]
    images: list[dict[str, Any]]  # metadata of every committed image, in part order
    errors: list[dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)  # sampled images with "thumbnail" data URIs
    order: str = "spread"  # how the samples were picked (ORDERS); "spread" when "score" found no scores


def read_output(url: str, storage_options: dict | None = None, sample: int = DEFAULT_SAMPLE, order: str = "spread") -> OutputData:
    """Read the committed runs of the output at ``url`` and a sample of up to ``sample``
    images: spread evenly over them (``order="spread"``), or the lowest ``clip_score``
    first (``"score"``: where the failures are; spread when no image has a score)."""
    fs, root = filesystem.open_url(url, storage_options)
    with filesystem.storage_errors(url, "read"):
        if not fs.exists(root):
            raise FileNotFoundError(root)
        manifests = commit_protocol.read_manifests(fs, root)
        images, errors, where = [], [], []
        for manifest in manifests:
            for part in sorted(manifest["parts"], key=lambda p: p["path"]):
                path = filesystem.join(root, part["path"])
                if part["path"].startswith(record_format.IMAGES_DIR + "/"):
                    rows = _read(fs, path, _META_COLUMNS).to_pylist()
                    where += [(path, i) for i in range(len(rows))]
                    images += rows
                else:
                    errors += _read(fs, path, None).to_pylist()
        picks = score_section.lowest_scores(images, sample) if order == "score" else []
        order = "score" if picks else "spread"
        picks = picks or _spread(len(images), sample)
        by_part: dict[str, list[int]] = defaultdict(list)
        for index in picks:
            by_part[where[index][0]].append(index)
        thumbnails: dict[int, str] = {}
        for path, indices in by_part.items():
            column = _read(fs, path, [S.IMAGE]).column(S.IMAGE)
            for index in indices:
                thumbnails[index] = thumbnail(column[where[index][1]].as_py()["bytes"], images[index][S.IMAGE_FORMAT])
    samples = [{**images[index], "thumbnail": thumbnails[index]} for index in picks]
    return OutputData(url, manifests, images, errors, samples, order)


def _read(fs: fsspec.AbstractFileSystem, path: str, columns: Optional[list[str]]) -> pa.Table:
    """``columns`` of the part at ``path`` (all when None); a column the part does not
    have (it was written before the column existed) comes back as nulls."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
    for name in columns or []:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table


def _spread(n: int, k: int) -> list[int]:
    """Up to ``k`` indices spread evenly over ``range(n)``: the same sample every time."""
    if n <= k:
        return list(range(n))
    return [i * n // k for i in range(k)]


def thumbnail(data: bytes, fmt: Optional[str]) -> str:
    """A data URI showing the image: its own bytes when small, else a JPEG at most
    :data:`THUMBNAIL_PX` on its longer side."""
    if fmt in _MIME:
        with Image.open(io.BytesIO(data)) as image:
            small = max(image.size) <= THUMBNAIL_PX
            if not small:
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, "JPEG", quality=85)
                data, fmt = buffer.getvalue(), "jpeg"
    return f"data:{_MIME.get(fmt or '', 'application/octet-stream')};base64,{base64.b64encode(data).decode()}"


# -- the page -------------------------------------------------------------------------------


def write_report(url: str, html_path: str, storage_options: dict | None = None, sample: int = DEFAULT_SAMPLE, order: str = "spread") -> OutputData:
    """Read the output at ``url`` and write its report page to ``html_path`` (any storage
    URL, written atomically). Returns what was read, for the caller's summary line."""
    data = read_output(url, storage_options, sample, order)
    fs, path = filesystem.open_url(absolute_if_local(html_path))
    filesystem.atomic_write(fs, path, render_html(data).encode())
    return data


def render_html(data: OutputData) -> str:
    """The report page: self-contained HTML (inline CSS, data URIs, inline SVG)."""
    e = html.escape
    n_images, n_errors = len(data.images), len(data.errors)
    sections = [
        f"<h1>imagegen output report</h1><p class=meta>{e(data.url)}<br>{len(data.manifests)} run(s), "
        f"{n_images} images, {n_errors} error rows; page made {e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}</p>",
        _contact_sheet(data.samples, n_images, data.order),
        score_section.quality_section(data.images),
        _runs_table(data.manifests),
        _charts(data.images, data.manifests),
        _errors(data.errors),
        _spec(data.manifests),
    ]
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>imagegen report: {e(data.url)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;margin:0}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
figure{margin:0;border:1px solid #ddd;border-radius:4px;padding:6px;background:#fafafa}
figure img{width:100%;height:auto;image-rendering:pixelated;display:block;background:#eee}
figcaption{font-size:12px;margin-top:4px;word-break:break-word}
figcaption .p{display:block;font-weight:600}figcaption .k{color:#666}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px}
.raw{font-family:monospace;font-size:12px;color:#555}
svg{background:#fff;border:1px solid #ddd;margin-bottom:12px}
"""


def _contact_sheet(samples: list[dict[str, Any]], total: int, order: str = "spread") -> str:
    e = html.escape
    if not samples:
        return "<h2>Images</h2><p>No images committed yet.</p>"
    figures = []
    for s in samples:
        prompt = s[S.PROMPT] or ""
        short = prompt if len(prompt) <= 140 else prompt[:137] + "..."
        params = (
            f"seed {s[S.SEED]} &middot; {s[S.WIDTH]}x{s[S.HEIGHT]} &middot; {s[S.STEPS]} steps &middot; "
            f"cfg {s[S.GUIDANCE_SCALE]:g} &middot; {e(str(s[S.MODEL]))}"
        )
        negative = f"<span class=k>negative: {e(s[S.NEGATIVE_PROMPT])}</span><br>" if s[S.NEGATIVE_PROMPT] else ""
        if s.get(S.CLIP_SCORE) is not None:
            params += f" &middot; clip {s[S.CLIP_SCORE]:.1f}"
        if s.get(S.NSFW_DETECTED):
            params += " &middot; <b>flagged by the safety checker</b>"
        figures.append(
            f'<figure><img src="{s["thumbnail"]}" alt="{e(short)}" title="{e(prompt)}">'
            f'<figcaption><span class=p title="{e(prompt)}">{e(short)}</span>{negative}<span class=k>{params}<br>'
            f"id {e(str(s[S.ID]))} &middot; {e(s[S.REQUEST_ID][:12])}</span></figcaption></figure>"
        )
    how = "lowest clip_score first" if order == "score" else "spread evenly over the runs"
    return f"<h2>Images ({len(samples)} of {total}, {how})</h2><div class=sheet>{''.join(figures)}</div>"


def _runs_table(manifests: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = []
    for m in manifests:
        c, wall = m["counts"], m.get("wall_seconds") or 0
        stages = ", ".join(f"{k}: {v}" for k, v in sorted(c.get("errors_by_stage", {}).items())) or "-"
        rate = f"{c['images'] / wall:.2f}" if wall else "-"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["started_at"])) if m.get("started_at") else "?"
        rows.append(
            f"<tr><td>{e(m['run_id'])}</td><td>{started}</td><td class=n>{wall:.1f}</td><td class=n>{c['input_rows']}</td>"
            f"<td class=n>{c['images']}</td><td class=n>{c['errors']}</td><td>{e(stages)}</td><td class=n>{rate}</td>"
            f"<td>{e(str(m.get('spec_fingerprint', '')))}</td><td>{e(_models(m))}</td></tr>"
        )
    return (
        "<h2>Runs</h2><table><tr><th>run</th><th>started (UTC)</th><th>seconds</th><th>input rows</th><th>images</th>"
        "<th>errors</th><th>errors by stage</th><th>images/s</th><th>spec</th><th>models</th></tr>" + "".join(rows) + "</table>"
    )


def _models(manifest: dict[str, Any]) -> str:
    """The run's models as ``name (family)``; runs from before named models show their fingerprint."""
    models = manifest.get("models")
    if not models:
        return str(manifest.get("model_fingerprint", ""))
    return ", ".join(f"{name} ({info.get('family', '?')})" for name, info in models.items())


def actor_series(images: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """One run's throughput per engine actor: ``(seconds since the run started, images/s
    over the actor's last few images)`` points.

    Images record their share of their diffusers call (``generation_seconds``) and their
    actor, not a clock time, so each actor's timeline is rebuilt: its images in input
    order (about the order the job fed them), back to back, ending at the run's end, since
    start-up (cluster, model load) comes first. Idle gaps are not recorded and do not show.
    """
    per_actor: dict[str, list[float]] = defaultdict(list)
    rows = [r for r in images if r[S.RUN_ID] == manifest["run_id"] and r[S.GENERATION_SECONDS] is not None]
    for r in sorted(rows, key=lambda r: (r[S.SOURCE], r[S.ROW_INDEX], r[S.IMAGE_INDEX])):
        per_actor[r[S.ACTOR_ID] or "?"].append(r[S.GENERATION_SECONDS])
    wall = manifest.get("wall_seconds") or 0.0
    series = {}
    for actor, seconds in per_actor.items():
        t = max(0.0, wall - sum(seconds))
        points = []
        for i, s in enumerate(seconds):
            t += s
            window = seconds[max(0, i - _ROLLING + 1) : i + 1]
            points.append((t, len(window) / sum(window) if sum(window) > 0 else 0.0))
        series[actor] = points
    return series


def _charts(images: list[dict[str, Any]], manifests: list[dict[str, Any]]) -> str:
    charts = []
    for m in [m for m in manifests if m["counts"]["images"]][-MAX_CHARTS:]:
        series = actor_series(images, m)
        if series:
            wall = m.get("wall_seconds") or max(t for points in series.values() for t, _ in points)
            overall = m["counts"]["images"] / wall if wall else None
            charts.append(svg_chart(series, wall, overall, f"run {m['run_id']}"))
    if not charts:
        return ""
    return (
        "<h2>Throughput over time, per engine actor</h2><p class=meta>Each line is one actor: images/s over its last "
        f"{_ROLLING} images, on a timeline rebuilt from each image's generation_seconds and the run's manifest "
        "(work back to back, ending at the run's end; idle gaps are not recorded). The dashed line is the run's "
        "overall images/s, start-up included. The legend gives each actor's images and its images/s while busy.</p>"
        + "".join(charts)
    )


def svg_chart(series: dict[str, list[tuple[float, float]]], x_max: float, reference: Optional[float], title: str) -> str:
    """A line chart as inline SVG: one polyline per series, axes with ticks, a legend, and
    an optional dashed horizontal ``reference`` line."""
    e = html.escape
    width, height, left, right, top, bottom = 900, 260, 56, 230, 28, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = max([y for points in series.values() for _, y in points] + [reference or 0]) * 1.1 or 1.0
    x_max = x_max or 1.0
    x = lambda t: left + plot_w * min(t, x_max) / x_max  # noqa: E731
    y = lambda v: top + plot_h * (1 - v / y_max)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<text x="{left}" y="18" font-size="13" font-weight="600">{e(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444"/>',
    ]
    for i in range(6):
        tx, ty = x_max * i / 5, y_max * i / 5
        parts.append(f'<line x1="{x(tx):.1f}" y1="{top + plot_h}" x2="{x(tx):.1f}" y2="{top + plot_h + 4}" stroke="#444"/>')
        parts.append(f'<text x="{x(tx):.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">{tx:.3g}</text>')
        parts.append(f'<line x1="{left}" y1="{y(ty):.1f}" x2="{left + plot_w}" y2="{y(ty):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y(ty) + 4:.1f}" font-size="11" text-anchor="end">{ty:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="11" text-anchor="middle">seconds since the run started</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2})">images/s</text>')
    if reference:
        parts.append(f'<line x1="{left}" y1="{y(reference):.1f}" x2="{left + plot_w}" y2="{y(reference):.1f}" stroke="#888" stroke-dasharray="5,4"/>')
    for n, (actor, points) in enumerate(sorted(series.items())):
        color = _PALETTE[n % len(_PALETTE)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        busy = sum(1 / v for _, v in points if v) if points else 0
        mean = f", {len(points) / busy:.2f}/s" if busy else ""
        ly = top + 14 + 18 * n
        parts.append(f'<rect x="{left + plot_w + 12}" y="{ly - 9}" width="12" height="3" fill="{color}"/>')
        parts.append(f'<text x="{left + plot_w + 30}" y="{ly}" font-size="11">actor {e(actor[:8])}: {len(points)} img{mean}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _errors(errors: list[dict[str, Any]]) -> str:
    e = html.escape
    if not errors:
        return "<h2>Errors</h2><p>No error rows.</p>"
    kinds = Counter((r[S.ERROR_STAGE], r[S.ERROR_TYPE]) for r in errors)
    rows = []
    for (stage, error_type), count in kinds.most_common():
        examples = [r for r in errors if (r[S.ERROR_STAGE], r[S.ERROR_TYPE]) == (stage, error_type)][:3]
        shown = "".join(
            f"<div>{e(str(r[S.ID]))}: {e(r[S.ERROR_MESSAGE] or '')}<br><span class=raw>{e(_clip(r[S.RAW] or '', 200))}</span></div>"
            for r in examples
        )
        rows.append(f"<tr><td>{e(str(stage))}</td><td>{e(str(error_type))}</td><td class=n>{count}</td><td>{shown}</td></tr>")
    return (
        f"<h2>Errors ({len(errors)} rows)</h2><table><tr><th>stage</th><th>type</th><th>rows</th><th>examples (id: reason, raw row)</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _spec(manifests: list[dict[str, Any]]) -> str:
    if not manifests:
        return ""
    latest = manifests[-1]
    text = yaml.safe_dump(latest.get("spec", {}), sort_keys=False, allow_unicode=True)
    others = len({m.get("spec_fingerprint") for m in manifests}) - 1
    note = f" ({others} other spec(s) in earlier runs: see the runs table and _runs/*.json)" if others > 0 else ""
    return f"<h2>Spec of the latest run, {html.escape(latest['run_id'])}{note}</h2><pre>{html.escape(text)}</pre>"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
