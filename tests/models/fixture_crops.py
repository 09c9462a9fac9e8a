"""The crops of the committed Keras fixture: 6 croppable cells of the real 5-channel site, in the
Cell Painting CNN's channel order (DNA, RNA, ER, AGP, Mito). ``make keras-fixture`` runs it:

    python -m tests.models.fixture_crops OUT.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tests.conftest import SHARED_DATA
from tests.extract.conftest import CHANNELS, site_crops

MODEL_ORDER = ["DNA", "RNA", "ER", "AGP", "Mito"]


def fixture_crops(count: int = 6) -> np.ndarray:
    table, crops = site_crops(SHARED_DATA / "images" / "pediatric_5ch_BR00143976_C03_s3")
    keep = np.flatnonzero(~table["border"].to_numpy(bool))
    chosen = keep[:: max(1, len(keep) // count)][:count]
    return crops[chosen][:, [CHANNELS.index(c) for c in MODEL_ORDER]]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    np.savez_compressed(out, crops=fixture_crops())
    print(out)
