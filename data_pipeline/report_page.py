"""The dataset report as one self-contained HTML file: plots and thumbnails are inlined as data: URIs.

One file opens from anywhere (a laptop, an object-store download, a CI artifact) with no server and
no network. Labels, URLs, domains and reasons come from whoever wrote the source table, so every
string is HTML-escaped, and the page carries a Content-Security-Policy that allows no script at all
and images from data: URIs only: even a label that slipped through escaping could not run code.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img.plot{max-width:100%}
.cls{margin:.8em 0}.cls h3{font-size:1em;margin:.2em 0}.thumbs img{margin:1px;vertical-align:top;border:1px solid #eee}
.note{color:#666}.problems li{color:#a00}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(data: dict) -> dict[str, str]:
    """PNG data URIs of the long tail, the failure reasons and the size histograms."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is rendered on servers and in CI
    import matplotlib.pyplot as plt

    plots = {}
    counts = data["classes"]["counts_desc"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    if counts:
        ranks = range(1, len(counts) + 1)
        ax.plot(ranks, [max(c, 0.8) for c in counts], drawstyle="steps-post")
        ax.set_yscale("log")
        if len(counts) > 50:
            ax.set_xscale("log")
    ax.set_xlabel("class rank (largest first)")
    ax.set_ylabel("ok images")
    ax.set_title("class long tail")
    ax.grid(alpha=.3)
    plots["longtail"] = _png(fig)

    failures = [r for r in data["reasons"] if r["reason"]][:20]
    fig, ax = plt.subplots(figsize=(9, 0.4 + 0.28 * max(1, len(failures))))
    ax.barh([f"{r['reason']} ({r['status']})" for r in failures][::-1], [r["rows"] for r in failures][::-1],
            color="#c0504d")
    ax.set_xlabel("rows")
    ax.set_title("failed and skipped rows by reason")
    plots["reasons"] = _png(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
    for ax, (key, label, scale) in zip(axes, (("width_px", "stored width, px", 1), ("height_px", "stored height, px", 1),
                                              ("bytes", "stored size, KiB", 1024))):
        hist = data["sizes"][key]
        if hist.get("count"):
            ax.hist([v / scale for v in hist["values"]], bins=min(40, max(1, len(hist["values"]))),
                    weights=hist["counts"], color="#4f81bd")
        ax.set_xlabel(label)
        ax.set_ylabel("images")
    fig.tight_layout()
    plots["sizes"] = _png(fig)
    return plots


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cells(tag: str, values: list[Any]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{_e(v)}</{tag}>" for i, v in enumerate(values))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _grid(title: str, classes: list[dict]) -> str:
    if not classes:
        return f"<h2>{_e(title)}</h2><p class=note>no classes with images</p>"
    blocks = []
    for c in classes:
        imgs = "".join(f'<img src="{_e(uri)}" alt="{_e(c["name"])}">' for uri in c["thumbs"])
        blocks.append(f'<div class=cls><h3>{_e(c["name"])} <span class=note>(id {c["id"]}, '
                      f'{_plural(c["count"], "image")})</span></h3><div class=thumbs>{imgs or "<span class=note>no sample found in the shards read</span>"}</div></div>')
    return f"<h2>{_e(title)}</h2>" + "".join(blocks)


def render_page(data: dict) -> str:
    """The whole page as a string (ASCII-safe: non-ASCII labels become character references)."""
    info, cls = data["dataset"], data["classes"]
    plots = _plots(data)
    totals = info.get("totals") or {}
    split_rows = []
    for split, entry in info["splits"].items():
        t = totals.get(split, {})
        split_rows.append([split, t.get("rows", "-"), entry["num_samples"], t.get("failed", "-"), t.get("skipped", "-"),
                           entry["num_shards"], f"{entry['bytes'] / 2**20:.1f}"])
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>dataset report: {_e(info['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>dataset report: {_e(info['name'])}</h1><p class=note>{_e(info['url'])} (format version "
        f"{_e(info['format_version'])})</p>",
        _table(["split", "rows", "ok images", "failed", "skipped", "shards", "MiB"], split_rows),
        "<h2>Class long tail</h2>",
        f'<img class=plot src="{plots["longtail"]}" alt="class long tail">',
        f"<p>{info['num_classes']} classes, {cls['num_empty']} without any image; median {cls['median']:g} images "
        f"per class, largest {cls['max']}; the largest 1% of classes hold {100 * cls['top_1pct_share']:.1f}% "
        "of the images.</p>",
        "<h2>Failure reasons</h2>",
    ]
    num_rows = sum(r["rows"] for r in data["reasons"])
    if data["have_index"]:
        parts.append(f'<img class=plot src="{plots["reasons"]}" alt="failure reasons">')
        parts.append(_table(["status", "reason", "rows", "share"],
                            [[r["status"], r["reason"] or "-", r["rows"], _pct(r["rows"], num_rows)]
                             for r in data["reasons"]], left=2))
        parts.append(f"<h2>By domain</h2><p>{data['num_domains']} domains.</p>")
        reasons = sorted({k for d in data["domains"] for k in d["reasons"]})
        parts.append(_table(["domain", "rows", "ok", "ok share", *reasons],
                            [[d["domain"], d["rows"], d["ok"], _pct(d["ok"], d["rows"]),
                              *[d["reasons"].get(k, "") for k in reasons]] for d in data["domains"]]))
    else:
        parts.append("<p class=note>this dataset has no index: per-row reasons, domains and sizes are unavailable.</p>")
    sizes = data["sizes"]
    parts.append("<h2>Image sizes (as stored)</h2>")
    parts.append(f'<img class=plot src="{plots["sizes"]}" alt="image size distributions">')
    stats = ("min", "p1", "p10", "p50", "p90", "p99", "max")
    rows = [[name, h.get("count", 0), *[h[k] if k in h else "-" for k in stats]]
            for name, h in (("width, px", sizes["width_px"]), ("height, px", sizes["height_px"]))]
    kib = sizes["bytes"]
    rows.append(["size, KiB", kib.get("count", 0), *[f"{kib[k] / 1024:.2f}" if k in kib else "-" for k in stats]])
    parts.append(_table(["quantity", "images", *stats[:3], "median", *stats[4:]], rows))
    parts.append(_grid("Largest classes", data["largest"]))
    parts.append(_grid("Rarest classes", data["rarest"]))
    if data["problems"]:
        items = "".join(f"<li>{_e(p)}</li>" for p in data["problems"][:200])
        more = f"<p>and {len(data['problems']) - 200} more</p>" if len(data["problems"]) > 200 else ""
        parts.append(f"<h2>Problems found</h2><ul class=problems>{items}</ul>{more}")
    parts.append("</body></html>\n")
    return "".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii")
