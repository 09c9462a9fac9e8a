"""Training configuration: the paper's recipe as defaults (Moshkov et al. 2024, Methods).

Every default below is a constant of the paper or of DeepProfiler's training code:

- EfficientNet-B0, 5 channels, ImageNet init with the stem replicated R,G,B,R,G ("Network");
- SGD, lr 0.005, batch 32, 30 epochs ("Training cell painting models"); momentum 0.9 with
  Nesterov and L2 1e-5 on kernels (DeepProfiler's Keras recipe);
- balanced epochs: the median number of cells per class, redrawn every epoch;
- augmentations: p=0.5 random crop of 80–100 % resized back, horizontal flip and 90° rotation,
  per-channel brightness ±0.1 and contrast 0.8–1.2 ("Data augmentation");
- leave-cells-out split with 60 % of every well's cells in training ("Data splits").

``compute`` holds the knobs that change speed, never the science (except ``lr_scaling`` with
more than one worker, which is the linear scaling rule of a larger global batch).

Architecture: ``efficientnet_b0`` (timm, PyTorch padding) is the default: it is the paper's
network, runs faster than the Keras-padded variant (static symmetric padding; cuDNN and
channels_last friendly), and the ImageNet weights users hold locally are timm/torchvision files for
it. ``tf_efficientnet_b0`` reproduces Keras' "same" padding and BN epsilon 1e-3: choose it to start
from (or compare against) the published Keras Cell Painting CNN weights bit for bit in layout.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raycp.config import check_ray_resources
from raycp.io.index import DEFAULT_CHANNELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    arch: str = Field("efficientnet_b0", description=(
        "timm EfficientNet: efficientnet_b0 (the paper's, PyTorch padding), tf_efficientnet_b0 (Keras 'same' "
        "padding and BN eps, to continue from the published Keras weights), efficientnet_lite0 (tests)"))
    imagenet_weights: str | None = Field(None, description="local ImageNet weights file (.safetensors/.pth); none: random init")
    stem: Literal["replicate", "timm"] = Field("replicate", description=(
        "5-channel stem from RGB filters: replicate R,G,B,R,G (DeepProfiler) or timm's rescaled adapt_input_conv"))
    drop_rate: float = Field(0.2, ge=0, lt=1, description="dropout before the classifier (Keras EfficientNet-B0: 0.2)")
    head_init: Literal["keras", "timm"] = Field("keras", description=(
        "classifier init: keras = Glorot-uniform, zero bias (the paper's Keras Dense); timm = timm's "
        "U(±1/√classes), whose large initial logits (cross-entropy ≈ 6.8 vs chance 2.56 at 13 classes) "
        "cost a short run its first epochs"))
    init: str | None = Field(None, description=(
        "fine-tune from an exported model folder (model.safetensors + model.json: `raycp train`'s, or the "
        "published Cell Painting CNN via `raycp model import-keras`): every layer but the classifier; its "
        "architecture, channels (stem permuted to `channels`' order) and crop normalisation are kept"))
    normalization: str | None = Field(None, description=(
        "crop normalisation preset (raycp.models.normalize.PRESETS); default: the init model's, else "
        "per_crop_channel_zscore"))

    @field_validator("init")
    @classmethod
    def _init(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("imagenet_weights"):
            raise ValueError("cannot be combined with model.imagenet_weights (exclusive): a fine-tuned model starts "
                             "from the init model's weights; unset model.imagenet_weights")
        return value

    @field_validator("normalization")
    @classmethod
    def _normalization(cls, value: str | None) -> str | None:
        from raycp.models.normalize import PRESETS

        if value is not None and value not in PRESETS:
            raise ValueError(f"normalization {value!r} unknown; use one of {', '.join(PRESETS)}")
        return value


#: options added after runs were written: they enter fingerprints only when they differ from the
#: behaviour those runs had, so that finished stages and checkpoints still match
_LEGACY_DEFAULTS = {"head_init": "timm", "init": None, "normalization": None}


def model_science(model: dict) -> dict:
    """A dumped :class:`ModelSection` as it enters fingerprints: ``head_init: timm`` (what runs written
    before the option existed used), no ``init`` and no ``normalization`` are left out."""
    return {k: v for k, v in model.items() if not (k in _LEGACY_DEFAULTS and v == _LEGACY_DEFAULTS[k])}


def train_science(tree: dict) -> dict:
    """A dumped train config as it enters fingerprints (:func:`model_science`; the formulation and
    its section only when it is not plain classification)."""
    out = dict(tree)
    if "model" in out:
        out["model"] = model_science(out["model"])
    formulation = out.pop("formulation", "classification")
    sections = {name: out.pop(name, None) for name in FORMULATIONS if name != "classification"}
    if formulation != "classification":
        out["formulation"] = formulation
        out[formulation] = sections[formulation]
    return out


class OptimSection(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1, description="crops per worker and step")
    lr: float = Field(0.005, gt=0, description="learning rate of one worker with batch_size crops")
    lr_scaling: Literal["linear", "none"] = Field("linear", description=(
        "linear: lr × workers (global batch = batch_size × workers); none: lr as given"))
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    l2: float = Field(1e-5, ge=0, description=(
        "Keras kernel_regularizer l2: loss += l2·Σw² over conv/dense kernels (= weight_decay 2·l2, BN and biases excluded)"))
    schedule: Literal["constant", "cosine"] = Field("constant", description=(
        "constant (the paper) or DeepProfiler's cosine: lr/(w−t) for t < w warm-up epochs, then ½(1+cos(πt/E))·lr"))
    warmup_epochs: int = Field(5, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


FORMULATIONS = ("classification", "ols", "mil", "grl")


class OLSSection(_Strict):
    """Online label smoothing (paper Methods, "Online label smoothing"; DeepProfiler
    ``online_labels_crop_generator``): soft labels start as label-smoothed one-hots and after every
    epoch move towards the network's predictions, ``L ← (1 − α)·L + α·P``."""

    alpha: float = Field(0.03, gt=0, le=1, description="α of the update rule (paper: 0.03; DeepProfiler online_lambda)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description=(
        "initial labels: (1 − ls) on the class + ls/K everywhere (paper: 0.1; DeepProfiler online_label_smoothing)"))
    labels: Literal["example", "class"] = Field("example", description=(
        "example: one soft label per training cell (the paper's, DeepProfiler's; n_train × K floats on every "
        "worker); class: one per class, updated with the class's mean prediction (K × K; Zhang et al. 2021's "
        "granularity, for training sets too large for per-cell labels)"))


class MILSection(_Strict):
    """Multiple instance learning with attention (paper Methods; Ilse et al. 2018): bags of cells from
    one well, the bag's label its treatment, an attention-weighted mean of the cells' pooled CNN
    features classified. Profiles are still per cell (block6a)."""

    bag_size: int = Field(8, ge=2, description="cells per bag, drawn from one well (with replacement from smaller wells)")
    bags_per_step: int = Field(4, ge=1, description=(
        "bags per worker and step (paper: 32 bags; cells per step = bags_per_step × bag_size)"))
    attention_dim: int = Field(128, ge=1, description="hidden size L of the attention network (Ilse et al.: 128)")
    gated: bool = Field(False, description="gated attention (tanh ⊙ sigmoid; Ilse et al.'s variant)")


class GRLSection(_Strict):
    """Gradient reversal (paper Methods; Ganin & Lempitsky 2015): a domain branch on the pooled CNN
    features, behind a layer that reverses (and scales by λ) its gradient, learns to tell domains
    apart while the backbone learns not to."""

    domain: str = Field("Metadata_Plate", description="the domain column of the crops (paper: plates)")
    hidden: list[int] = Field(default_factory=lambda: [1024, 512, 128], description="dense layers of the domain branch (paper)")
    weight: float = Field(1.0, gt=0, description="λ: the reversed gradient's scale")
    schedule: Literal["constant", "ganin"] = Field("constant", description=(
        "constant λ, or Ganin's λ·(2/(1 + exp(−10 p)) − 1) over training progress p"))


class AugmentSection(_Strict):
    enabled: bool = True
    crop_prob: float = Field(0.5, ge=0, le=1, description="probability of a random square crop resized back")
    crop_min: float = Field(0.8, gt=0, le=1, description="smallest crop side as a fraction of the crop")
    flip: bool = True
    rot90: bool = True
    brightness: float = Field(0.1, ge=0, description="per-channel additive Δ ~ U(−b, b) on normalised pixels")
    contrast: tuple[float, float] = Field((0.8, 1.2), description="per-channel factor ~ U(lo, hi) about the channel mean")


class SplitSection(_Strict):
    strategy: Literal["leave_cells_out", "leave_plates_out", "column"] = "leave_cells_out"
    train_fraction: float = Field(0.6, gt=0, lt=1, description="leave-cells-out: fraction of each well's cells in training")
    val_plates: list[str] | None = Field(None, description="leave-plates-out: plates held out (default: chosen)")
    min_val_wells: int = Field(2, ge=1, description="leave-plates-out: replicate wells every treatment keeps in validation")
    column: str = Field("Metadata_Split", description="strategy=column: a column of the crop shards with train/val")
    val_max_cells: int | None = Field(10_000, ge=1, description="validation cells scored per epoch (fixed random subset)")


class TrainCompute(_Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU)")
    use_gpu: bool | None = Field(None, description=(
        "default: use GPUs when the cluster has them now; on an autoscaling cluster whose GPU nodes start "
        "from 0, true (the workers wait for the autoscaler to add GPU nodes)"))
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "other Ray resources each worker asks for, e.g. {'accelerator_type:A100': 0.001} or a node type's "
        "custom resource"))
    cpus_per_worker: float = Field(1.0, gt=0)
    data_cpus: float = Field(0.5, gt=0, description="CPUs of each Ray Data read task that feeds the workers")
    reader: Literal["ray_data", "local"] = Field("ray_data", description=(
        "ray_data: crops read by Ray Data tasks; local: read by threads inside each worker"))
    max_cached_crops: int = Field(32_768, ge=64, description=(
        "crops a worker keeps in memory (5×128×128 uint8 = 80 KiB each: 2.5 GiB); a screen that fits is read once, "
        "larger epochs are read in windows every epoch"))
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the latest checkpoint (-1: unlimited)")
    keep_checkpoints: int | None = Field(3, ge=1, description="checkpoints kept (latest ones); none: all")
    deterministic: bool = Field(True, description=(
        "the same weights for the same config and seed on the same machine: on GPU, cuDNN's deterministic "
        "algorithms without autotuning and torch's deterministic mode (slower); CPU training is deterministic "
        "either way (threads fixed: cpus_per_worker rounded half up)"))
    bf16: bool = Field(True, description="bf16 autocast on GPU (never on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on GPU")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (tests, benchmarks)")

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        return check_ray_resources(value)


class TrainConfig(_Strict):
    crops: str = Field(..., description="crop shards: a folder (or file) URL of Parquet written by `raycp preprocess`")
    output: str = Field(..., description="run folder URL; training writes <output>/train/")
    name: str = Field("checkpoints", description="Ray Train run name under <output>/train (same name = resume)")
    label: str = Field("Metadata_Treatment", description="the class column (treatments, controls included)")
    classes: list[str] | None = Field(None, description="classes in output order (default: every label, sorted)")
    channels: list[str] = Field(default_factory=lambda: list(DEFAULT_CHANNELS))
    crop_column: str | None = Field(None, description="tensor column of the shards (default: detected)")
    exclude_border_cells: bool = Field(False, description="drop crops with Metadata_TouchesBorder")
    seed: int = Field(0, ge=0)
    resume: bool = Field(True, description="resume from the latest checkpoint of <output>/train/<name>")
    resume_from: str | None = Field(None, description=(
        "a checkpoint folder (<output>/train/<name>/epoch_NNNN) to continue from when this run has no "
        "checkpoint of its own, e.g. a new name after the latest checkpoint of an old run was corrupt"))
    formulation: Literal["classification", "ols", "mil", "grl"] = Field("classification", description=(
        "classification (the paper's weakly supervised recipe), ols (online label smoothing), mil (multiple "
        "instance learning with attention) or grl (gradient reversal against plates): Supplementary Figs. 1, 5"))
    ols: OLSSection = Field(default_factory=OLSSection)
    mil: MILSection = Field(default_factory=MILSection)
    grl: GRLSection = Field(default_factory=GRLSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    split: SplitSection = Field(default_factory=SplitSection)
    compute: TrainCompute = Field(default_factory=TrainCompute)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        lo, hi = self.augment.contrast
        if not 0 < lo <= hi:
            raise ValueError("augment.contrast must be (lo, hi) with 0 < lo <= hi")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes has duplicates")
        return self

    def science(self) -> dict:
        """The fields a resumed run must share with the run that wrote its checkpoints."""
        tree = self.model_dump(mode="json", exclude={"compute", "output", "name", "resume", "resume_from", "crops"})
        tree["optim"].pop("epochs")
        return train_science(tree)
