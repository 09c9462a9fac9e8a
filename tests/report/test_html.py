"""The report is one self-contained page: tables inline, figures embedded, nothing fetched."""

from __future__ import annotations

import base64
import re

import pandas as pd

from raycp.evaluate.plots import _plt
from raycp.report import Section, render_report


def _png() -> bytes:
    import io

    plt = _plt()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def test_report_embeds_figures_and_escapes_text():
    png = _png()
    table = pd.DataFrame({"feature set": ["cnn <trained>", "imagenet"], "map_paper": [0.31234, 0.2]})
    page = render_report("raycp run", "mini screen", [
        Section("Comparison", text="a < b & c", tables=[("mAP", table)], figures=[("λ curve", png)]),
    ])
    assert "a &lt; b &amp; c" in page and "cnn &lt;trained&gt;" in page and "0.3123" in page
    srcs = re.findall(r"src='([^']+)'", page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == png
    assert "http://" not in page and "https://" not in page
