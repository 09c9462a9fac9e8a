"""Configuration of the image stages; defaults are the paper's / DeepProfiler's constants.

Every section is strict (unknown keys are errors). The sections are the run config's
``illumination``, ``compression``, ``nuclei`` and ``crops`` (:class:`RunConfig`).
This module imports only pydantic so that :mod:`raycp.config` can import it.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raycp.config import ComputeConfig, DataConfig, build_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IlluminationConfig(_Strict):
    """Paper Methods: one illumination function per plate × channel, computed at 25 % size."""

    enabled: bool = Field(True, description="correct illumination before compression and cropping")
    scale: float = Field(0.25, gt=0, le=1, description="downscale factor of the averaged images")
    median_radius: int = Field(12, ge=0, description="radius of the median-filter disk, at that scale")
    robust_percentile: float = Field(2.0, ge=0, lt=50, description="percentile used as the robust minimum")


class CompressionConfig(_Strict):
    """Paper Methods: stretch each image to its own 0.05/99.95 percentiles, 8 bits, lossless PNG."""

    low_percentile: float = Field(0.05, ge=0, lt=50)
    high_percentile: float = Field(99.95, gt=50, le=100)
    png_level: int = Field(6, ge=0, le=9, description="zlib level of the PNGs (lossless at any level)")

    @model_validator(mode="after")
    def _ordered(self) -> CompressionConfig:
        if self.low_percentile >= self.high_percentile:
            raise ValueError("low_percentile must be below high_percentile")
        return self


class NucleiConfig(_Strict):
    """Where nuclei centres come from: a CellProfiler table, or detection on the DNA channel.

    Detection (paper: CellProfiler's Otsu segmentation of the Hoechst channel): Gaussian smoothing,
    global Otsu threshold, holes filled, clumps split by watershed on the distance transform,
    objects kept when their equivalent diameter lies in [min, max] × the typical diameter and
    they stand ``min_contrast`` background-noise units above the background.
    """

    locations: Optional[str] = Field(
        None, description="nuclei centres to import: CellProfiler SQLite (.sqlite/.db), a Parquet/CSV "
                          "table, or a per-site CSV template with {plate} {well} {site}; "
                          "empty: detect on the DNA channel")
    channel: str = Field("DNA", description="channel used for detection")
    smoothing_sigma: float = Field(2.0, ge=0, description="Gaussian sigma (px) before thresholding")
    threshold_correction: float = Field(1.0, gt=0, description="multiplies the Otsu threshold")
    diameter: Optional[float] = Field(
        None, gt=0, description="typical nucleus diameter (px); empty: estimated per image")
    min_diameter_fraction: float = Field(0.35, gt=0, description="smallest kept object / diameter")
    max_diameter_fraction: float = Field(3.0, gt=0, description="largest kept object / diameter")
    declump_distance_fraction: float = Field(0.25, gt=0, description="minimum distance between "
                                             "two nuclei centres / diameter")
    min_contrast: float = Field(5.0, ge=0, description="kept objects stand this many background "
                                "noise sigmas above the background")


class CropsConfig(_Strict):
    """Paper Methods: 128×128 crops centred on the nucleus, no resizing, cells kept in context."""

    size: int = Field(128, ge=16, le=1024)
    skip_border: bool = Field(False, description="drop cells whose box leaves the image "
                              "(default: keep them zero-padded and flagged Metadata_TouchesBorder)")
    mask: bool = Field(False, description="append a mask channel (255 inside the cell) taken from the "
                       "label image named by mask_channel; the image channels stay unmasked")
    mask_channel: Optional[str] = Field(None, description="index channel holding a label (or binary) image")
    export_deepprofiler: bool = Field(False, description="also write one PNG strip per cell and "
                                      "sc-metadata.csv, as DeepProfiler's export-sc does")

    @model_validator(mode="after")
    def _mask(self) -> CropsConfig:
        if self.mask and not self.mask_channel:
            raise ValueError("crops.mask needs crops.mask_channel (an index channel holding a label image)")
        if self.size % 2:
            raise ValueError("crops.size must be even so that the nucleus sits on the centre pixel")
        return self


class PreprocessConfig(_Strict):
    """The four image stages together (what :mod:`raycp.preprocess.pipeline` needs)."""

    illumination: IlluminationConfig = Field(default_factory=IlluminationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    nuclei: NucleiConfig = Field(default_factory=NucleiConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)

    @classmethod
    def of(cls, run) -> PreprocessConfig:
        """The sections of a run config (any object with these attributes; missing ones default)."""
        parts = {}
        for name, model in (("illumination", IlluminationConfig), ("compression", CompressionConfig),
                            ("nuclei", NucleiConfig), ("crops", CropsConfig)):
            section = getattr(run, name, None)
            if section is not None:
                data = section.model_dump() if hasattr(section, "model_dump") else dict(section)
                parts[name] = model.model_validate(data)
        return cls(**parts)


class RunConfig(_Strict):
    """A run of the image stages: inputs/outputs, the paper's preprocessing constants, compute.

    ``raycp run`` extends it with training, feature sets and profiles
    (:class:`raycp.run.config.PipelineConfig`); ``raycp preprocess`` reads exactly this."""

    data: DataConfig
    illumination: IlluminationConfig = Field(default_factory=IlluminationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    nuclei: NucleiConfig = Field(default_factory=NucleiConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] | None = None) -> RunConfig:
    """The image stages' config from a run YAML (other stages' sections skipped) and overrides."""
    return build_config(RunConfig, path, overrides, skip_other_sections=True)
