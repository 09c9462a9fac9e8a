"""The ``raycp run`` config: the whole paper in one file (Moshkov et al. 2024, Methods).

:class:`PipelineConfig` extends the image stages' :class:`raycp.preprocess.config.RunConfig` with training,
the feature sets to extract and compare, and the profiling/evaluation constants. Each stage's own
config (``TrainConfig``, ``ExtractConfig``) is derived from it (:meth:`PipelineConfig.train_config`, :meth:`PipelineConfig.extract_config`), so a
typo or an impossible value anywhere fails before any work starts. Imports only pydantic.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, create_model, field_validator, model_validator

from raycp.config import _Strict
from raycp.extract.config import CellProfilerConfig, InferenceConfig, ModelConfig, OutputsConfig
from raycp.preprocess.config import RunConfig
from raycp.train.config import TrainConfig

_RUN_FILLS = ("crops", "output", "channels")  # the run sets these from data.* and the crops stage

TrainSection = create_model(
    "TrainSection", __base__=_Strict, __doc__="``raycp train``'s config less the paths the run fills in "
    "(crops = <run>/crops, output = <run>, channels = data.channels); defaults are the paper's recipe.",
    enabled=(bool, Field(True, description="train the CNN (off: only the baselines are compared)")),
    **{name: (f.annotation, f) for name, f in TrainConfig.model_fields.items() if name not in _RUN_FILLS},
)


class ProfilesConfig(_Strict):
    """Aggregation, sphering and evaluation (paper Methods, "Profiles" and "Evaluation")."""

    treatment_cols: list[str] = Field(default_factory=lambda: ["Metadata_Treatment"],
                                      description="columns whose tuple keys a treatment")
    annotation_col: str = Field("Metadata_MoA", description="MoA/pathway column: a hit shares ≥1 annotation")
    annotation_sep: str = Field("|", description="separator of several annotations in one cell")
    control_query: str = Field("Metadata_IsControl == True", description="pandas query selecting control wells")
    standardize: list[str] = Field(default_factory=lambda: ["cellprofiler"], description=(
        "feature sets whose well profiles are first standardised to the control wells (one mean and sd "
        "for the screen: classical features span 1e-3 to 1e4, and λ is an absolute floor on variances); "
        "CNN features are sphered as they are"))
    sphere_lambda: float = Field(0.01, gt=0, description="sphering λ of the comparison (paper: 1e-2 for "
                                 "CNN features)")
    lambdas: list[float] = Field(default_factory=lambda: [1.0, 0.1, 0.01, 0.001, 0.0001],
                                 description="the λ curve (paper Fig. 6B)")
    sphere_scope: Literal["screen", "plate"] = Field("screen", description="fit one sphering on the whole "
                                                    "screen's controls (paper) or one per plate")
    umap: bool = Field(True, description="UMAPs of well profiles before/after sphering (paper Fig. 6A/C)")
    effect_features: Optional[str] = Field(
        "cellprofiler", description="feature set whose sphered well profiles rank the treatment effect "
                                    "(paper: CellProfiler features); falls back to the first feature set")
    effect_fraction: float = Field(0.2, gt=0, le=0.5, description="size of the weakest/median/strongest "
                                   "subsets (paper Table 1: 20 %)")
    na_cutoff: float = Field(0.05, ge=0, le=1, description=(
        "a feature NaN in more than this fraction of the well profiles is dropped before wells with NaN are "
        "(pycytominer's drop_na_columns rule and default)"))

    @field_validator("lambdas")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("every λ must be > 0 (no correction is always evaluated too)")
        return sorted(set(value), reverse=True)

    @field_validator("treatment_cols")
    @classmethod
    def _cols(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one treatment column")
        return value


class RetrievalConfig(_Strict):
    """copairs' mAP with p-values per feature set (the JUMP papers' metrics): phenotypic activity
    (each treatment's wells against the control wells of their plates) and phenotypic consistency
    (treatments sharing an annotation), on the well profiles — after ``recipe`` when one is set."""

    enabled: bool = Field(True, description="compute phenotypic activity and consistency")
    recipe: Optional[str] = Field(None, description=(
        "profile recipe applied to each feature set's wells first: a preset (jump_compound, jump_orf, "
        "jump_crispr) or a recipe YAML; its steps are written under retrieval/<set>/recipe/"))
    plate_col: str = Field("Metadata_Plate", description="activity ranks replicates against this plate's controls")
    null_size: int = Field(10_000, ge=1, description="copairs' null size (JUMP recipe: 10000)")
    threshold: float = Field(0.05, gt=0, lt=1, description="p-value threshold of below_p / below_corrected_p")
    seed: int = Field(0, description="copairs' null seed")
    consistency_on: Literal["active", "all"] = Field("active", description=(
        "consistency of the phenotypically active treatments (JUMP) or of all"))
    ray: bool = Field(False, description="split the plates / query blocks and the nulls across the run's Ray "
                                         "cluster (the same numbers; for a whole JUMP source)")


class PipelineConfig(RunConfig):
    """``raycp run CONFIG``: index → crops → WSL training → features → profiles → report."""

    imagenet_weights: Optional[str] = Field(
        None, description="local ImageNet EfficientNet weights file: the CNN's initialisation and the "
                          "ImageNet baseline (never downloaded)")
    source_run: Optional[str] = Field(None, description=(
        "a finished run whose image stages (crops) this run reads instead of its own: a sweep trial "
        "(raycp sweep subsets) trains, extracts, profiles and evaluates under its own data.output from its "
        "base run's crops. Default: this run's own"))
    train: TrainSection = Field(default_factory=TrainSection)
    features: list[ModelConfig] = Field(..., description=(
        "feature sets to extract and compare: trained (the CNN of the train stage), imagenet, "
        "cellprofiler, random; an imagenet set without path uses imagenet_weights. Default: trained, "
        "imagenet (when imagenet_weights is set) and cellprofiler, the paper's comparison"))
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    cellprofiler: CellProfilerConfig = Field(default_factory=CellProfilerConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    profiles: ProfilesConfig = Field(default_factory=ProfilesConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_features(cls, data):
        """Default feature sets, and imagenet_weights as the path of imagenet sets without one."""
        if not isinstance(data, dict):
            return data
        weights = data.get("imagenet_weights")
        features = data.get("features")
        if features is None:
            features = [{"kind": "trained"}] + ([{"kind": "imagenet"}] if weights else []) + [{"kind": "cellprofiler"}]
        if isinstance(features, list):
            features = [{**f, "path": weights} if isinstance(f, dict) and f.get("kind") == "imagenet"
                        and not f.get("path") and weights else f for f in features]
        return {**data, "features": features}

    @model_validator(mode="after")
    def _feature_sets(self) -> PipelineConfig:
        names = [f.folder_name for f in self.features]
        if not names:
            raise ValueError("features: choose at least one feature set")
        if len(set(names)) != len(names):
            raise ValueError(f"features: two sets write to the same folder ({', '.join(names)}); give them names")
        if any(f.kind == "trained" for f in self.features) and not self.train.enabled and not all(
                f.path for f in self.features if f.kind == "trained"):
            raise ValueError("features: a trained set needs train.enabled or a model.path")
        return self

    def train_config(self) -> TrainConfig:
        """``raycp train``'s config for this run (crops from the crops stage, output = the run)."""
        tree = self.train.model_dump(mode="json", exclude={"enabled"})
        if tree["model"].get("imagenet_weights") is None and self.imagenet_weights and not tree["model"].get("init"):
            tree["model"]["imagenet_weights"] = self.imagenet_weights
        from raycp.layout import RunLayout

        crops = RunLayout(self.source_run or self.data.output).folder("crops")
        return TrainConfig.model_validate({**tree, "crops": crops,
                                           "output": self.data.output, "channels": list(self.data.channels)})

    def extract_config(self, model: ModelConfig):
        """``raycp extract``'s config for one feature set (crops from the crops stage of this run, or
        of ``source_run``)."""
        from raycp.extract.config import ExtractConfig

        return ExtractConfig(data=self.data, input="crops", source_run=self.source_run, model=model, outputs=self.outputs,
                             inference=self.inference, cellprofiler=self.cellprofiler,
                             illumination=self.illumination, compression=self.compression, nuclei=self.nuclei,
                             crops=self.crops, compute=self.compute)
