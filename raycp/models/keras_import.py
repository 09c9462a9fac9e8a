"""Import a Keras (DeepProfiler) Cell Painting CNN into raycp's model export, with no TensorFlow.

The published Cell Painting CNN v1 (Zenodo 7114558, ``Cell_Painting_CNN_v1.hdf5``; the model of
JUMP's ``cpcnn_zenodo_7114558`` profiles) is a Keras *weights-only* HDF5 (``Model.save_weights``) of
DeepProfiler's network (``plugins/models/efficientnet.py``): PyPI ``efficientnet`` 1.1.1's
``EfficientNetB0(include_top=False, weights=None)`` on 128×128×5 crops, then
``GlobalAveragePooling2D(name="pool5")`` and ``Dense(classes, softmax, name="ClassProb")``.

That file is read with h5py (Keras' layout: root attribute ``layer_names``, one group per layer with
attribute ``weight_names``, datasets ``<layer>/<layer>/<var>:0``) and each variable is copied into
timm's ``tf_efficientnet_b0`` (same arithmetic: "same" padding, BatchNorm ε 1e-3, swish, SE on
the block's input width), transposed from Keras' HWIO to torch's OIHW:

=====================================  ==========================================
Keras layer                            timm module
=====================================  ==========================================
``stem_conv`` / ``stem_bn``            ``conv_stem`` / ``bn1``
``block1a_dwconv`` ``_bn``             ``blocks.0.0.conv_dw`` / ``bn1``
``block1a_project_conv`` ``_bn``       ``blocks.0.0.conv_pw`` / ``bn2``
``blockNx_expand_conv`` ``_bn``        ``blocks.N-1.x.conv_pw`` / ``bn1``
``blockNx_dwconv`` / ``_bn``           ``blocks.N-1.x.conv_dw`` / ``bn2``
``blockNx_se_reduce`` / ``_expand``    ``blocks.N-1.x.se.conv_reduce`` / ``conv_expand``
``blockNx_project_conv`` / ``_bn``     ``blocks.N-1.x.conv_pwl`` / ``bn3``
``top_conv`` / ``top_bn``              ``conv_head`` / ``bn2``
``ClassProb`` (any one Dense)          ``classifier``
=====================================  ==========================================

The width and depth multipliers are read off the file (the stem's filters and each stage's
blocks), so EfficientNet-B0…B7 and reduced test models convert alike. Anything that does not fit
is refused with :class:`~raycp.errors.InputError` naming the first mismatching layer.

Sources: DeepProfiler ``plugins/models/efficientnet.py`` (model), qubvel/efficientnet 1.1.1
``efficientnet/model.py`` (layer names, rounding), timm ``efficientnet.py`` (``_gen_efficientnet``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raycp.errors import InputError

#: PyPI efficientnet 1.1.1's B0 blocks: (repeats, output filters) per stage; B0…B7 multipliers
BASE_STAGES = ((1, 16), (2, 24), (2, 40), (3, 80), (3, 112), (4, 192), (1, 320))
STANDARD = {(1.0, 1.0): "tf_efficientnet_b0", (1.0, 1.1): "tf_efficientnet_b1", (1.1, 1.2): "tf_efficientnet_b2",
            (1.2, 1.4): "tf_efficientnet_b3", (1.4, 1.8): "tf_efficientnet_b4", (1.6, 2.2): "tf_efficientnet_b5",
            (1.8, 2.6): "tf_efficientnet_b6", (2.0, 3.1): "tf_efficientnet_b7"}
_BLOCK = re.compile(r"^block(\d)([a-z])_")
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    """efficientnet 1.1.1's (and timm's ``round_channels``) filter rounding."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


@dataclass
class KerasWeights:
    """The variables of a Keras weights-only HDF5: ``layers[name][var] -> ndarray`` (float32), in
    the file's layer order; ``sha256`` of the file's bytes."""

    path: str
    layers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sha256: str = ""


def read_keras_weights(path: str | Path) -> KerasWeights:
    """Read ``save_weights`` HDF5 (Keras 2 / tf.keras layout) without TensorFlow.

    Raises :class:`InputError` when the file is missing, not HDF5, or a full-model save
    (``model_weights`` group) is given: the latter is read from its ``model_weights`` group."""
    import h5py

    path = str(path)
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not a weights file", fix="pass the Keras weights file, e.g. Cell_Painting_CNN_v1.hdf5")
    if not Path(path).is_file():
        raise InputError(f"{path}: file not found", fix="pass the Keras weights file, e.g. Cell_Painting_CNN_v1.hdf5")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not a readable HDF5 file (not HDF5, or truncated)",
                         fix="pass a complete Keras weights file written by save_weights (.h5/.hdf5)") from None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    out = KerasWeights(path=path, sha256=digest)
    with handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        names = [_text(n) for n in root.attrs.get("layer_names", list(root.keys()))]
        if not names:
            raise InputError(f"{path}: no Keras layers in the file", fix="pass a file written by Keras save_weights")
        for layer in names:
            group = root.get(layer)
            if group is None:
                raise InputError(f"{path}: layer {layer} is listed but missing (the file is damaged)",
                                 fix="download or save the weights file again")
            variables = {}
            for wname in (_text(n) for n in group.attrs.get("weight_names", [])):
                var = wname.rsplit("/", 1)[-1].split(":")[0]
                try:
                    value = np.asarray(group[wname], dtype=np.float32)
                except (KeyError, OSError):
                    raise InputError(f"{path}: layer {layer} variable {var} cannot be read (the file is damaged)",
                                     fix="download or save the weights file again") from None
                bad = int(np.size(value) - np.isfinite(value).sum())
                if bad:
                    raise InputError(f"{path}: layer {layer} variable {var} has {bad} NaN or infinite values",
                                     fix="use a weights file saved from a model that trained without diverging")
                variables[var] = value
            if variables:
                out.layers[layer] = variables
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Geometry:
    """What the file's shapes say about the network."""

    in_chans: int
    width: float
    depth: float
    repeats: tuple[int, ...]
    num_classes: int
    head_layer: str | None

    @property
    def arch(self) -> str:
        return STANDARD.get((self.width, self.depth), "tf_efficientnet_b0")

    @property
    def arch_args(self) -> dict:
        """timm multipliers when the geometry is not one of B0…B7 (reduced test models)."""
        if (self.width, self.depth) in STANDARD:
            return {}
        return {"channel_multiplier": self.width, "depth_multiplier": self.depth}


def infer_geometry(weights: KerasWeights) -> Geometry:
    """Width and depth multipliers, input channels and classes from the variables' shapes."""
    layers = weights.layers
    where = weights.path
    if "stem_conv" not in layers or "kernel" not in layers["stem_conv"]:
        first = next(iter(layers), None)
        raise InputError(f"{where}: layer stem_conv not found (first layer with weights: {first})",
                         fix="pass the weights of a Keras EfficientNet (PyPI efficientnet / DeepProfiler), saved with save_weights")
    stem = layers["stem_conv"]["kernel"]
    if stem.ndim != 4:
        raise InputError(f"{where}: layer stem_conv has a kernel of shape {tuple(stem.shape)}, not a 2-D convolution's",
                         fix="pass the weights of a Keras EfficientNet (PyPI efficientnet / DeepProfiler)")
    in_chans, stem_out = int(stem.shape[2]), int(stem.shape[3])
    repeats = []
    for stage in range(1, 8):
        letters = {m.group(2) for name in layers if (m := _BLOCK.match(name)) and m.group(1) == str(stage)}
        repeats.append(len(letters))
    for stage, count in enumerate(repeats, start=1):
        if count == 0:
            raise InputError(f"{where}: layer block{stage}a_project_conv not found (no block of stage {stage})",
                             fix="pass the weights of a full Keras EfficientNet (all 7 stages)")
    top = layers.get("top_conv", {}).get("kernel")
    if top is None:
        raise InputError(f"{where}: layer top_conv not found", fix="pass the weights of a full Keras EfficientNet "
                         "(DeepProfiler saves it with include_top=False: top_conv and top_bn are kept)")
    head_out = int(top.shape[-1])
    # the width from the stem and the head alone, so that a wrong block is named by its own layer below
    widths = [w for w in sorted({w for w, _ in STANDARD} | {round(0.025 * k, 3) for k in range(2, 161)})
              if round_filters(32, w) == stem_out and round_filters(1280, w) == head_out]
    depths = [d for d in sorted({d for _, d in STANDARD} | {round(0.05 * k, 2) for k in range(1, 121)})
              if all(math.ceil(d * r) == n for (r, _), n in zip(BASE_STAGES, repeats))]
    if not widths or not depths:
        raise InputError(f"{where}: stem {stem_out} filters, top_conv {head_out} filters and blocks per stage {repeats} "
                         "fit no EfficientNet width/depth multiplier", fix="pass an EfficientNet B0-B7 weights file")
    pick = next(((w, d) for w in widths for d in depths if (w, d) in STANDARD), (widths[0], depths[0]))
    dense = [name for name, v in layers.items() if "kernel" in v and v["kernel"].ndim == 2]
    if len(dense) > 1:
        raise InputError(f"{where}: {len(dense)} dense layers {dense[:4]}; DeepProfiler's model has one (ClassProb)",
                         fix="pass a DeepProfiler Cell Painting CNN weights file")
    classes = int(layers[dense[0]]["kernel"].shape[1]) if dense else 0
    return Geometry(in_chans, pick[0], pick[1], tuple(repeats), classes, dense[0] if dense else None)


#: a block's Keras layers -> timm modules: block1 (no expansion: timm DepthwiseSeparableConv) and the
#: others (InvertedResidual)
_FIRST_STAGE = (("dwconv", "conv_dw"), ("bn", "bn1"), ("se_reduce", "se.conv_reduce"), ("se_expand", "se.conv_expand"),
                ("project_conv", "conv_pw"), ("project_bn", "bn2"))
_OTHER_STAGES = (("expand_conv", "conv_pw"), ("expand_bn", "bn1"), ("dwconv", "conv_dw"), ("bn", "bn2"),
                 ("se_reduce", "se.conv_reduce"), ("se_expand", "se.conv_expand"), ("project_conv", "conv_pwl"),
                 ("project_bn", "bn3"))


def _layer_tensors(layer: str, target: str) -> list[tuple[str, str, str]]:
    """``(keras layer, variable, timm tensor)`` of one layer, by its kind (read off its name)."""
    if layer.endswith("bn"):
        return [(layer, k, f"{target}.{v}") for k, v in _BN.items()]
    if layer.endswith("dwconv"):
        return [(layer, "depthwise_kernel", f"{target}.weight")]
    out = [(layer, "kernel", f"{target}.weight")]
    if "_se_" in layer:
        out.append((layer, "bias", f"{target}.bias"))
    return out


def keras_to_timm_names(geometry: Geometry) -> list[tuple[str, str, str]]:
    """``(keras layer, keras variable, timm tensor)`` for every tensor of the network, in order."""
    out = _layer_tensors("stem_conv", "conv_stem") + _layer_tensors("stem_bn", "bn1")
    for s, count in enumerate(geometry.repeats):
        for i in range(count):
            for keras, timm in _FIRST_STAGE if s == 0 else _OTHER_STAGES:
                out += _layer_tensors(f"block{s + 1}{chr(ord('a') + i)}_{keras}", f"blocks.{s}.{i}.{timm}")
    out += _layer_tensors("top_conv", "conv_head") + _layer_tensors("top_bn", "bn2")
    if geometry.head_layer:
        out += [(geometry.head_layer, "kernel", "classifier.weight"), (geometry.head_layer, "bias", "classifier.bias")]
    return out


def _axes(var: str, ndim: int) -> tuple[int, ...] | None:
    """The transpose from Keras' layout to torch's, or None where they agree (biases, BN vectors)."""
    if var == "depthwise_kernel":  # (kh, kw, C, 1) -> (C, 1, kh, kw)
        return (2, 3, 0, 1)
    if var == "kernel" and ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return (3, 2, 0, 1)
    if var == "kernel" and ndim == 2:  # Dense (in, out) -> Linear (out, in)
        return (1, 0)
    return None


def _to_torch_layout(var: str, value: np.ndarray) -> np.ndarray:
    axes = _axes(var, value.ndim)
    return value if axes is None else np.ascontiguousarray(value.transpose(axes))


def _keras_shape(var: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A timm tensor's shape in Keras' layout (the inverse of :func:`_to_torch_layout`)."""
    axes = _axes(var, len(shape))
    return tuple(shape) if axes is None else tuple(shape[i] for i in np.argsort(axes))


def convert(weights: KerasWeights, geometry: Geometry | None = None):
    """``(timm model in eval mode, geometry)`` holding the file's weights exactly.

    Every Keras variable is used once and every timm tensor is filled once; the first layer that
    is missing, left over or of another shape raises :class:`InputError` naming it."""
    import torch

    from raycp.models.network import create_model

    geometry = geometry or infer_geometry(weights)
    model = create_model(geometry.arch, num_classes=geometry.num_classes, in_chans=geometry.in_chans,
                         drop_rate=0.0, arch_args=geometry.arch_args)
    target = model.state_dict()
    used: set[tuple[str, str]] = set()
    state = {}
    for layer, var, name in keras_to_timm_names(geometry):
        value = weights.layers.get(layer, {}).get(var)
        if value is None:
            raise InputError(f"{weights.path}: layer {layer} has no variable {var!r} "
                             f"(expected for {geometry.arch}; the file has {sorted(weights.layers.get(layer, {})) or 'no such layer'})",
                             fix="pass the weights of DeepProfiler's EfficientNet (PyPI efficientnet 1.1.1 layer names)")
        tensor = _to_torch_layout(var, value)
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise InputError(f"{weights.path}: layer {layer} variable {var} has shape {tuple(value.shape)}, "
                             f"{geometry.arch} expects {_keras_shape(var, tuple(target[name].shape))} (Keras layout)",
                             fix="pass the weights of DeepProfiler's EfficientNet (PyPI efficientnet 1.1.1)")
        state[name] = torch.from_numpy(tensor.copy())
        used.add((layer, var))
    extra = [(layer, var) for layer, vs in weights.layers.items() for var in vs if (layer, var) not in used]
    if extra:
        layer, var = extra[0]
        raise InputError(f"{weights.path}: layer {layer} (variable {var}) has no place in {geometry.arch} "
                         f"({len(extra)} unused variables)", fix="pass a DeepProfiler Cell Painting CNN weights file")
    for name, value in target.items():
        state.setdefault(name, value)  # BatchNorm's num_batches_tracked
    model.load_state_dict(state)
    return model.eval(), geometry
