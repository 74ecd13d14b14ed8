"""``reports/index.html``: one self-contained, offline page with every result.

The page needs nothing but itself: figures are embedded as base64 ``data:`` URIs, the CSS is
inline, there is no script and no external URL, so it can be mailed, archived as an MLflow
artifact, or opened from a USB stick. Contents:

1. Table 1 (``<table id="table1">``): per row (model, score) our validation AUC, test AUC, accuracy and
   sensitivity (with 95% bootstrap intervals when the metrics carry ``test_<m>_ci_low`` /
   ``test_<m>_ci_high``) beside the paper's numbers (Zhou et al., ISBI 2020, OCT2017).
2. More metrics (``<table id="details">``): specificity, F1, average precision, per-class AUCs,
   pixel AUROC of each anomaly map against the lesion masks, phi and its criterion.
3. The figures of :mod:`sparsegan.figures`, with headings, then each row's full metrics.

Every table row of a Table-1 row carries ``data-row="<row>"``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .figures import FIGURE_CAPTIONS

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1250px;padding:0 1em;color:#1f2328;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;
margin-top:1.6em}h3{margin-bottom:.3em}
.prov{color:#57606a;font-size:.85em;font-family:ui-monospace,Menlo,Consolas,monospace}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #d0d7de;padding:.3em .55em;text-align:right;vertical-align:top}
th{background:#f6f8fa}td.name,th.name{text-align:left;font-weight:600}
.ci{color:#57606a;font-size:.85em;white-space:nowrap}.paper{color:#8250df}
.na{color:#8c959f}figure{margin:.8em 0 1.4em}figure img{max-width:100%;height:auto;
border:1px solid #d0d7de}figcaption{color:#57606a;font-size:.9em;margin-top:.2em}
nav a{margin-right:.9em}pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:.8em}
.note{color:#57606a;font-size:.88em}
"""

TABLE1_METRICS = (("val_auc", "val AUC", 1), ("test_auc", "test AUC", 2),
                  ("test_accuracy", "test Acc", 3), ("test_sensitivity", "test Sen", 4))


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if not math.isfinite(v) else float(v)


def _fmt(v, digits: int = 3) -> str:
    x = _num(v)
    if x is None:
        return '<span class="na">&ndash;</span>'
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.4g}"


def _cell(m: Mapping, key: str, digits: int = 3) -> str:
    """A value with its 95% interval when ``<key>_ci_low`` / ``<key>_ci_high`` exist."""
    text = _fmt(m.get(key), digits)
    lo, hi = _num(m.get(f"{key}_ci_low")), _num(m.get(f"{key}_ci_high"))
    if lo is not None and hi is not None:
        text += f'<br><span class="ci">[{lo:.{digits}f}, {hi:.{digits}f}]</span>'
    return text


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table1(metrics: Mapping[str, Mapping], paper_table: Mapping[str, Sequence]) -> list[str]:
    head = "".join(f"<th>{label}<br>ours</th><th class=paper>paper</th>"
                   for _, label, _ in TABLE1_METRICS)
    out = ['<table id="table1">', f'<thead><tr><th class="name">method</th>{head}</tr></thead>',
           "<tbody>"]
    for row, m in metrics.items():
        paper = paper_table.get(row)
        name = paper[0] if paper else row
        cells = []
        for key, _, pi in TABLE1_METRICS:
            cells.append(f"<td>{_cell(m, key)}</td>")
            cells.append(f'<td class="paper">{_fmt(paper[pi]) if paper else _fmt(None)}</td>')
        out.append(f'<tr data-row="{html.escape(row)}"><td class="name">'
                   f'{html.escape(name)}<br><span class="ci">{html.escape(row)}</span></td>'
                   + "".join(cells) + "</tr>")
    out += ["</tbody></table>",
            '<p class="note">Ours: test metrics at the phi chosen on validation only; '
            "[95% interval] where a bootstrap was run. Paper: Zhou et al., ISBI 2020, Table 1 "
            "(OCT2017, 224x224).</p>"]
    return out


def _details(metrics: Mapping[str, Mapping]) -> list[str]:
    keys = [k for m in metrics.values() for k in m]
    classes = sorted({m.group(1) for k in keys
                      if (m := re.fullmatch(r"test_auc_([A-Z][A-Z0-9]*)", k))})
    pixel = sorted({k for k in keys if k.startswith("pixel_auroc_")
                    and not k.endswith(("_ci_low", "_ci_high"))})
    cols = [("test_specificity", "Spec"), ("test_f1", "F1")]
    ap = next((k for k in ("test_average_precision", "test_ap") if k in keys), None)
    if ap:
        cols.append((ap, "AP"))
    cols += [(f"test_auc_{c}", f"AUC {c}") for c in classes]
    cols += [(k, "pixel AUROC " + k.removeprefix("pixel_auroc_")) for k in pixel]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
    out = ['<table id="details">', f'<thead><tr><th class="name">row</th>{head}'
           "<th>phi</th><th>criterion</th></tr></thead>", "<tbody>"]
    for row, m in metrics.items():
        cells = "".join(f"<td>{_cell(m, k)}</td>" for k, _ in cols)
        out.append(f'<tr data-row="{html.escape(row)}"><td class="name">'
                   f"{html.escape(row)}</td>{cells}<td>{_fmt(m.get('phi'), 4)}</td>"
                   f"<td>{html.escape(str(m.get('criterion', '')))}</td></tr>")
    out += ["</tbody></table>",
            '<p class="note">Per-class AUC: that disease vs NORMAL on the test set. Pixel AUROC: '
            "each anomaly map as a lesion-pixel classifier on the diseased test scans (needs "
            "lesion masks, i.e. synthetic data).</p>"]
    return out


def _figure(path: Path) -> str:
    path = Path(path)
    caption = FIGURE_CAPTIONS.get(path.stem, path.stem.replace("_", " "))
    return (f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)} "
            f"(<code>{html.escape(path.name)}</code>)</figcaption></figure>")


def write_index(metrics: Mapping[str, Mapping], figures: Mapping[str, Sequence[Path]],
                out_html: Path, paper_table: Mapping[str, Sequence],
                provenance: Mapping[str, object] | None = None,
                title: str = "Sparse-GAN for retinal OCT: results") -> Path:
    """Write the page. ``metrics``: row -> its ``metrics.json``; ``figures``: as returned by
    :func:`sparsegan.figures.make_figures` (key ``"overview"`` first, then one key per row);
    ``paper_table``: row -> (name, val AUC, test AUC, Acc, Sen), e.g.
    ``sparsegan.evaluate.PAPER_TABLE1``; ``provenance``: optional facts for the header line
    (params hash, seed, git commit, ...)."""
    out_html = Path(out_html)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if provenance:
        parts.append('<p class="prov">' + " &middot; ".join(
            f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in provenance.items())
            + "</p>")
    sections = [k for k in figures if k != "overview" and figures[k]]
    nav = ['<a href="#table1-section">Table 1</a>', '<a href="#details-section">more metrics</a>']
    if figures.get("overview"):
        nav.append('<a href="#overview">ROC</a>')
    nav += [f'<a href="#v-{html.escape(v)}">{html.escape(v)}</a>' for v in sections]
    parts.append("<nav>" + "".join(nav) + "</nav>")
    parts.append('<h2 id="table1-section">Table 1: ours beside the paper</h2>')
    parts += _table1(metrics, paper_table)
    parts.append('<h2 id="details-section">More metrics</h2>')
    parts += _details(metrics)
    if figures.get("overview"):
        parts.append('<h2 id="overview">ROC curves</h2>')
        parts += [_figure(p) for p in figures["overview"]]
    for key in sections:
        parts.append(f'<h2 id="v-{html.escape(key)}">{html.escape(key)}</h2>')
        parts += [_figure(p) for p in figures[key]]
    parts.append("<h2>All metrics</h2>")
    for row, m in metrics.items():
        parts.append(f"<details><summary>{html.escape(row)}</summary><pre>"
                     f"{html.escape(json.dumps(m, indent=1, default=str))}</pre></details>")
    parts.append("</body></html>")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text("\n".join(parts), encoding="utf-8")
    return out_html
