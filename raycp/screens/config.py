"""Screen-builder configuration: preset < YAML file < ``--set key=value`` overrides.

Presets: ``mini`` (CI: 2 plates × 96 wells, 12 treatments, 320-px sites, seconds), ``small``
(4 plates, 40 treatments, the demo) and ``bench`` (8 × 384-well plates, 320 treatments, ~10⁴ sites).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raycp.config import ComputeConfig, build_config
from raycp.errors import ConfigError
from raycp.io import urls
from raycp.io.index import DEFAULT_CHANNELS
from raycp.io.shared import shared_data_dir
from raycp.screens.programs import MOAS, check_moas

PHENIX_5CH_MAP = {5: "DNA", 2: "ER", 6: "RNA", 3: "AGP", 4: "Mito"}
SOURCE_SITE = "images/pediatric_5ch_BR00143976_C03_s3"


def default_source() -> str:
    return urls.join(str(shared_data_dir()), SOURCE_SITE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """Where the real cells come from (see :mod:`raycp.screens.cells`)."""

    folders: list[str] = Field(default_factory=lambda: [default_source()], min_length=1,
                               description="5-channel Cell Painting site folders (Phenix naming)")
    channel_map: dict[int, str] = Field(default_factory=lambda: dict(PHENIX_5CH_MAP),
                                        description="Phenix channel number -> channel")
    segmentation: Literal["auto", "outlines", "own"] = "auto"
    binning: int = Field(2, ge=1, le=4, description="camera binning of the source pixels")
    cell_p99_adu: float = Field(1500.0, gt=0, le=4095, description="ADU of the cells' 99.5th percentile")


class LayoutConfig(_Strict):
    """Plate maps (see :mod:`raycp.screens.layout`)."""

    plates: int = Field(2, ge=1, le=1000)
    wells: Literal[96, 384] = 96
    replicates: int = Field(5, ge=1, le=100, description="replicate wells per treatment, spread over plates")
    controls_per_plate: int = Field(8, ge=1)
    sites_per_well: int = Field(3, ge=1, le=64)
    perturbation: Literal["compound", "gene"] = Field(
        "compound", description="compound screens have DMSO controls, gene screens EMPTY")
    plate_prefix: str = Field("SCR", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,20}$")


class TreatmentConfig(_Strict):
    """Treatments (see :mod:`raycp.screens.layout` and :mod:`raycp.screens.programs`)."""

    n: int = Field(12, ge=1, le=100000)
    moas: list[str] = Field(default_factory=lambda: list(MOAS), min_length=1)
    multi_moa_fraction: float = Field(0.1, ge=0, le=1, description="treatments with a second MoA")
    strong_fraction: float = Field(0.2, ge=0, le=1)
    weak_fraction: float = Field(0.3, ge=0, le=1)
    null_fraction: float = Field(0.2, ge=0, le=1)
    strength_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"null": (0.0, 0.0), "weak": (0.12, 0.25), "median": (0.35, 0.6),
                                 "strong": (0.8, 1.0)})
    responding_fraction: tuple[float, float] = Field((0.5, 0.9))

    @field_validator("moas")
    @classmethod
    def _moas(cls, value: list[str]) -> list[str]:
        try:
            return check_moas(value)
        except ConfigError as exc:
            raise ValueError(exc.one_line()) from None

    @model_validator(mode="after")
    def _fractions(self) -> TreatmentConfig:
        if self.strong_fraction + self.weak_fraction + self.null_fraction > 1 + 1e-9:
            raise ValueError("strong_fraction + weak_fraction + null_fraction exceed 1")
        lo, hi = self.responding_fraction
        if not 0 < lo <= hi <= 1:
            raise ValueError("responding_fraction must be (low, high) with 0 < low <= high <= 1")
        if set(self.strength_ranges) != {"null", "weak", "median", "strong"}:
            raise ValueError("strength_ranges needs exactly null, weak, median and strong")
        for name, (a, b) in self.strength_ranges.items():
            if not 0 <= a <= b <= 1:
                raise ValueError(f"strength_ranges.{name} must be (low, high) within [0, 1]")
        return self


class ImageConfig(_Strict):
    size: int = Field(320, ge=64, le=4096, description="site width = height (px)")
    cells_per_site: float = Field(22.0, gt=0, le=2000, description="mean cells per control site")
    compression: Literal["zlib", "lzw", "none"] = "zlib"


class ConfounderConfig(_Strict):
    """Strength of each confounder (see :mod:`raycp.screens.confounders`); 0 turns one off."""

    plate_gain_sd: float = Field(0.2, ge=0, le=2)
    plate_offset_sd: float = Field(8.0, ge=0)
    illumination: float = Field(0.3, ge=0, le=1)
    edge_gain: float = Field(0.12, ge=0, le=2)
    edge_density: float = Field(0.15, ge=0, le=0.9)
    plate_density_sd: float = Field(0.08, ge=0, le=1)
    focus_sigma: float = Field(0.5, ge=0, le=10)
    plate_focus_sd: float = Field(0.3, ge=0, le=2)
    adu_per_electron: float = Field(0.5, ge=0)
    read_noise: float = Field(1.5, ge=0)
    bit_depth: int = Field(12, ge=8, le=16)


class ScreenConfig(_Strict):
    name: str = Field("raycp-screen", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    channels: list[str] = Field(default_factory=lambda: list(DEFAULT_CHANNELS))
    source: SourceConfig = Field(default_factory=SourceConfig)
    layout: LayoutConfig = Field(default_factory=LayoutConfig)
    treatments: TreatmentConfig = Field(default_factory=TreatmentConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    confounders: ConfounderConfig = Field(default_factory=ConfounderConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    batch_sites: int = Field(8, ge=1, le=10000, description="sites per Ray task")

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        if sorted(value) != sorted(DEFAULT_CHANNELS):
            raise ValueError(f"screens are built with the paper's 5 channels {list(DEFAULT_CHANNELS)} (any order)")
        return value

    @model_validator(mode="after")
    def _channel_map(self) -> ScreenConfig:
        mapped = set(self.source.channel_map.values())
        missing = [c for c in self.channels if c not in mapped]
        if missing:
            raise ValueError(f"source.channel_map has no source channel for {', '.join(missing)}")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "mini": {
        "name": "mini",
        "layout": {"plates": 2, "wells": 96, "replicates": 5, "controls_per_plate": 8, "sites_per_well": 3},
        "treatments": {"n": 12, "moas": ["nuclear_enlargement", "mitochondrial_stress", "er_stress",
                                         "actin_remodeling"]},
        "image": {"size": 320, "cells_per_site": 22},
        "batch_sites": 8,
    },
    "small": {
        "name": "small",
        "layout": {"plates": 4, "wells": 96, "replicates": 5, "controls_per_plate": 16, "sites_per_well": 3},
        "treatments": {"n": 40},
        "image": {"size": 384, "cells_per_site": 30},
        "batch_sites": 12,
    },
    "bench": {
        "name": "bench",
        "layout": {"plates": 8, "wells": 384, "replicates": 5, "controls_per_plate": 32, "sites_per_well": 6},
        "treatments": {"n": 320},
        "image": {"size": 384, "cells_per_site": 30},
        "batch_sites": 24,
    },
}


def load_screen_config(preset: str | None = "mini", path: str | None = None,
                       overrides: list[str] | tuple[str, ...] | None = None) -> ScreenConfig:
    """Resolve a :class:`ScreenConfig` from a preset, an optional YAML file and ``--set`` overrides."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown screen preset {preset!r}", fix=f"use one of {', '.join(PRESETS)}")
    return build_config(ScreenConfig, path, overrides, base=PRESETS[preset] if preset else None,
                        source=f"preset {preset}" if preset else None)


def dump(config: ScreenConfig) -> str:
    from raycp.config import redact

    return yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False)
