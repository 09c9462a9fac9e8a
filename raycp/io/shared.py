"""Where the real data lives: ``$RAYCP_SHARED_DATA``, else ``../shared/data`` (from the working directory)."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "RAYCP_SHARED_DATA"


def shared_data_dir() -> Path:
    """The real images and profiles folder (see ``../shared/data/README.md``)."""
    return Path(os.environ.get(ENV) or Path("..") / "shared" / "data")
