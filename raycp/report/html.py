"""Self-contained HTML: tables as HTML, figures as base64-embedded PNGs, no external assets."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import pandas as pd

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}th{background:#f4f4f6}
td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:.4rem 1rem .4rem 0;
vertical-align:top}figure img{max-width:520px;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
p.note{font-size:.9rem;color:#444}
"""


@dataclass
class Section:
    """One titled part of the report: text, tables and PNG figures, in that order."""

    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def _table(caption: str, frame: pd.DataFrame) -> str:
    body = frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", na_rep="–")
    head = f"<p class='note'><b>{html.escape(caption)}</b></p>" if caption else ""
    return head + body


def _figure(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_report(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole page as one string (write it with ``urls.atomic_write_text``)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class='sub'>{html.escape(subtitle)}</p>"]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p class='note'>{html.escape(sec.text)}</p>")
        parts.extend(_table(c, f) for c, f in sec.tables)
        parts.extend(_figure(c, p) for c, p in sec.figures)
    parts.append("</body></html>")
    return "\n".join(parts)
