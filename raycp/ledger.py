"""Per-stage accounting: every input ends processed or quarantined with a reason.

processed + quarantined = total, written as ``<stage>/ledger.parquet`` and ``ledger.json``
beside the stage's outputs and printed at the end of every CLI verb.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from raycp.io import urls

PROCESSED, QUARANTINED = "processed", "quarantined"
LEDGER_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "status", "reason")


@dataclass
class Ledger:
    """Outcome of one stage over its inputs (one row per input unit, usually a site)."""

    stage: str
    rows: list[dict] = field(default_factory=list)

    def processed(self, key: dict, **extra) -> None:
        self.rows.append({**key, "status": PROCESSED, "reason": "", **extra})

    def quarantined(self, key: dict, reason: str, **extra) -> None:
        self.rows.append({**key, "status": QUARANTINED, "reason": reason, **extra})

    def extend(self, frame: pd.DataFrame) -> None:
        self.rows.extend(frame.to_dict("records"))

    @property
    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        for col in ("status", "reason"):
            if col not in frame.columns:
                frame[col] = pd.Series(dtype=object)
        return frame

    def summary(self) -> dict:
        frame = self.table
        status = Counter(frame["status"]) if len(frame) else Counter()
        reasons = Counter(frame.loc[frame["status"] == QUARANTINED, "reason"]) if len(frame) else Counter()
        out = {
            "stage": self.stage,
            "total": int(len(frame)),
            "processed": int(status.get(PROCESSED, 0)),
            "quarantined": int(status.get(QUARANTINED, 0)),
            "reasons": dict(sorted(reasons.items())),
        }
        assert out["processed"] + out["quarantined"] == out["total"], "ledger rows with unknown status"
        return out

    def write(self, folder: str) -> None:
        """``ledger.parquet`` (every row) and ``ledger.json`` (the summary), atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        frame = self.table
        if all(k in frame.columns for k in LEDGER_COLUMNS[:3]):
            frame = frame.sort_values(list(LEDGER_COLUMNS[:3]), kind="stable").reset_index(drop=True)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame.astype({"reason": str}), preserve_index=False), buf)
        urls.atomic_write_bytes(urls.join(folder, "ledger.parquet"), buf.getvalue())
        urls.atomic_write_text(urls.join(folder, "ledger.json"), json.dumps(self.summary(), indent=2))


def short_reason(exc: BaseException) -> str:
    """A one-line quarantine reason from an exception (user errors keep their own text)."""
    from raycp.errors import RaycpError

    if isinstance(exc, RaycpError):
        return exc.one_line()
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


@dataclass(kw_only=True)
class StageOutcome:
    """What a stage did: its ledger and its figures (printed by the CLIs, kept in ``status.json``)."""

    ledger: Ledger
    figures: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        """The accounting (``total`` = ``processed`` + ``quarantined``, ``reasons``) and the figures."""
        return {**self.ledger.summary(), **self.figures}
