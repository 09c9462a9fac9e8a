"""Feature extractors: load once, forward a batch of uint8 crops, get float32 features.

Paper Methods, "Feature extraction": single-cell crops go through the network once; features are
the output of EfficientNet's ``block6a_activation`` (timm ``blocks.5.0.bn2``, 672×4×4 at 128 px)
averaged over space — the forward is truncated there, the head never runs. Three specs:

- ``trained``: a model exported by ``raycp train`` or imported by ``raycp model import-keras``
  (``raycp.models.export.load_model``), crops normalised by the preset its ``model.json`` names
  (:func:`raycp.models.normalize.normalizer`; raycp's training: per crop and channel z-score);
- ``imagenet``: the paper's ImageNet baseline, :class:`raycp.extract.imagenet.ImageNetBaseline`
  (each channel alone, [−1, 1], ×3, 224 px; 5 × 672 = 3,360 features);
- ``random``: the same architecture randomly initialised with a seed, normalised like ``trained``:
  the floor any learned representation must beat.

:class:`Extractor` holds the module on its device (channels_last, bfloat16 autocast on GPU) and
packs crops into batches of ``batch_size``. A cell's features do not depend on the other crops of
its batch: on CPU this is what the kernels do (tested); on GPU every batch is padded to one shape,
so the same kernels run whatever the packing. Re-runs are byte-identical.

:func:`fingerprint` identifies a model by its weights and settings; an output folder made by
another model is refused instead of being resumed into.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raycp.errors import InputError
from raycp.io import urls
from raycp.layout import RunLayout

FEATURE_PREFIX = "efn"


def feature_names(dim: int, channels: list[str] | None = None) -> list[str]:
    """``efn_0000 …`` (one model pass per cell) or ``DNA_efn_0000 …`` (one pass per channel)."""
    if channels is None:
        return [f"{FEATURE_PREFIX}_{i:04d}" for i in range(dim)]
    per = dim // len(channels)
    return [f"{ch}_{FEATURE_PREFIX}_{i:04d}" for ch in channels for i in range(per)]


@dataclass
class ModelInfo:
    """What the driver learns from loading a model once: its channels, size and identity."""

    kind: str
    channels: list[str]
    dim: int
    feature_names: list[str]
    fingerprint: str
    crop_size: int | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "dim": self.dim, "fingerprint": self.fingerprint,
                "crop_size": self.crop_size, "n_features": len(self.feature_names), **self.details}


def _hash_state(state: dict, extra: dict) -> str:
    import torch

    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(module, extra: dict) -> str:
    """sha256 of a module's tensors and the settings that change its features (first 16 hex).

    The classifier head is left out: features are taken before it, and a model built from
    ImageNet weights gets a freshly initialised head each time it is loaded, which must not make
    a resumed run look like another model's."""
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("classifier")}
    return _hash_state(state, extra)


def _local_weights(path: str) -> str:
    """A local file for ``path`` (an object-store URL is fetched once into a temp file)."""
    if urls.protocol_of(path) == "file" and "://" not in path:
        return path
    try:
        data = urls.read_bytes(path)
    except FileNotFoundError:
        raise InputError(f"{path}: weights file not found", fix="check model.path") from None
    suffix = os.path.splitext(path)[1] or ".pth"
    fd, local = tempfile.mkstemp(suffix=suffix, prefix="raycp-weights-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return local


# -- building the modules -------------------------------------------------------------------------

def _trained(model_cfg, channels: list[str], run: str):
    """``(FeatureModel, preprocess, info_dict, channels in the model's input order, crop size)`` of
    an exported model (``raycp train`` or ``raycp model import-keras``). The model's channel names
    are mapped to the screen's by ``model.channel_map``; crops must arrive in the returned order."""
    from raycp.models.export import load_model
    from raycp.models.network import FeatureModel
    from raycp.models.normalize import normalizer

    folder = model_cfg.path or RunLayout(run).model
    try:
        model, info = load_model(folder)
    except RuntimeError as exc:  # state dict does not fit the architecture named in model.json
        raise InputError(f"{folder}: model.safetensors does not match its model.json ({' '.join(str(exc).split())[:200]})",
                         fix="re-export the model with `raycp train`") from None
    want = list(info.get("channels") or [])
    in_chans = int(info.get("in_chans", len(want) or len(channels)))
    if want and len(want) != in_chans:
        raise InputError(f"{folder}: model.json lists {len(want)} channels {want} for {in_chans} inputs",
                         fix="re-export the model with `raycp train`")
    mapping = dict(model_cfg.channel_map or {})
    key = "channel_map (model.channel_map; features[].channel_map in a run config)"
    unknown = sorted(set(mapping) - set(want)) if want else []
    if unknown:
        raise InputError(f"{key} names {unknown}, which are not channels of the model {want}",
                         fix="map the model's channel names (keys) to the screen's (values), e.g. {DNA: Hoechst}")
    model_names = list(want)
    want = [mapping.get(c, c) for c in want] if want else list(channels)
    twice = sorted({c for c in want if want.count(c) > 1})
    if twice:
        raise InputError(f"{key} {mapping} gives the model's channels {model_names} the screen names {want}: "
                         f"{twice} twice", fix="map each model channel to a different screen channel")
    if in_chans != len(channels) or sorted(want) != sorted(channels):
        mapped = f" (screen names after {key}: {want})" if mapping else ""
        missing = [m for m, w in zip(model_names, want) if w not in channels]
        hint = (f"map the model's channels to the screen's with {key}, e.g. "
                f"{{{', '.join(f'{m}: <screen name>' for m in missing[:2])}}}" if missing else
                f"set data.channels to {want} (the index must hold them)")
        raise InputError(f"{folder}: the model takes {in_chans} input channels {model_names}{mapped} but data.channels "
                         f"has {len(channels)}: {list(channels)}", fix=hint + ", or use a model trained on these channels")
    layer = model_cfg.layer
    features = FeatureModel(model.eval(), layer)
    details = {"arch": info.get("arch"), "layer": layer, "path": folder,
               "normalization": info.get("normalization"), "classes": len(info.get("classes") or [])}
    if info.get("arch_args"):
        details["arch_args"] = info["arch_args"]
    if mapping:
        details["channel_map"] = {k: mapping[k] for k in sorted(mapping)}
    return features, normalizer(info.get("normalization")), details, want, info.get("crop_size")


def _random(model_cfg, channels: list[str]):
    import torch

    from raycp.models.network import FeatureModel, create_model
    from raycp.models.normalize import normalize

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(model_cfg.seed)
        model = create_model(model_cfg.arch, num_classes=1000, in_chans=len(channels), drop_rate=0.0)
    finally:
        torch.random.set_rng_state(state)
    features = FeatureModel(model.eval(), model_cfg.layer)
    return features, normalize, {"arch": model_cfg.arch, "layer": model_cfg.layer, "seed": model_cfg.seed}


def _imagenet(model_cfg):
    from raycp.extract.imagenet import ImageNetBaseline

    local = _local_weights(model_cfg.path)
    try:
        module = ImageNetBaseline.from_weights(local, arch=model_cfg.arch, layer=model_cfg.layer)
    finally:
        if local != model_cfg.path:
            os.unlink(local)
    module.size = model_cfg.image_size
    return module, {"arch": model_cfg.arch, "layer": model_cfg.layer, "path": model_cfg.path,
                    "image_size": model_cfg.image_size, "input": "per channel, min-max to [-1, 1], x3, resized"}


class Extractor:
    """A loaded feature model: ``features(uint8 N×C×S×S) -> float32 N×D``, in chunks of ``batch_size``.

    ``forward_calls`` counts the model passes (one per chunk), for accounting and tests.
    """

    def __init__(self, module, preprocess: Callable | None, info: ModelInfo, *, device: str = "cpu",
                 precision: str = "auto", batch_size: int = 256, channels_last: bool = True) -> None:
        import torch

        self.info = info
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.channels_last = channels_last and info.kind != "imagenet"
        use_bf16 = precision == "bfloat16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        module = module.eval().to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.preprocess = preprocess
        self.forward_calls = 0

    @property
    def dim(self) -> int:
        return self.info.dim

    def _to_device(self, crops):
        """uint8 crops on the model's device. On GPU through two reused pinned host buffers
        (the copy of one batch overlaps the compute of the previous one; an event guards reuse)."""
        import torch

        if isinstance(crops, torch.Tensor):
            return crops.to(self.device)
        if self.device.type != "cuda":
            return torch.from_numpy(crops if crops.flags.writeable else crops.copy())
        n, shape = len(crops), tuple(crops.shape[1:])
        self._slot = (getattr(self, "_slot", 0) + 1) % 2
        buffers = getattr(self, "_pinned", [None, None])
        held = buffers[self._slot]
        if held is None or held[0].shape[1:] != shape or held[0].shape[0] < n:
            held = (torch.empty((max(n, self.batch_size), *shape), dtype=torch.uint8, pin_memory=True), None)
        buf, event = held
        if event is not None:
            event.synchronize()  # the previous copy out of this buffer is done
        buf[:n].numpy()[...] = crops
        x = buf[:n].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        buffers[self._slot] = (buf, event)
        self._pinned = buffers
        return x

    def _forward_device(self, crops):
        """One model pass over a batch of uint8 crops -> float32 features, left on the device."""
        import torch

        x = self._to_device(crops)
        if self.preprocess is not None:
            x = self.preprocess(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                y = self.module(x)
        else:
            y = self.module(x)
        self.forward_calls += 1
        return y.float()

    def forward(self, crops) -> torch.Tensor:  # noqa: F821 - torch imported lazily
        """One model pass over a batch of uint8 crops (numpy or torch) -> float32 on CPU."""
        import torch

        with torch.inference_mode():
            return self._forward_device(crops).cpu()

    def features(self, crops: np.ndarray) -> np.ndarray:
        """All crops of one site: ``N×D`` float32 (``0×D`` for no crops)."""
        return self.features_many([crops])[0]

    def features_many(self, sites: list[np.ndarray], *, pad: bool = False) -> list[np.ndarray]:
        """The crops of several sites packed into chunks of ``batch_size`` (fewer model passes when
        sites are small); features come back split per site. With ``pad`` the last chunk is
        zero-padded to ``batch_size`` so that every pass has one shape: the kernels (and a cell's
        float32 result) then do not depend on which sites share its batch. The device is
        synchronised once per call, not once per chunk."""
        import torch

        sizes = [len(s) for s in sites]
        total = int(sum(sizes))
        if total == 0:
            return [np.zeros((0, self.dim), dtype=np.float32) for _ in sites]
        crops = sites[0] if len(sites) == 1 else np.concatenate(sites)
        outs = []
        with torch.inference_mode():
            for lo in range(0, total, self.batch_size):
                chunk = crops[lo:lo + self.batch_size]
                n = len(chunk)
                if pad and n < self.batch_size:
                    chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
                outs.append(self._forward_device(chunk)[:n])
            feats = torch.cat(outs).cpu().numpy()
        return list(np.split(feats, np.cumsum(sizes)[:-1]))


def resolve_device(inference_cfg, cluster_gpus: float = 0.0) -> str:
    """``cuda`` when asked for (or ``auto`` with GPUs in the cluster), else ``cpu``."""
    if inference_cfg.device == "auto":
        return "cuda" if cluster_gpus > 0 else "cpu"
    return inference_cfg.device


def load_extractor(model_cfg, channels: list[str], *, run: str, device: str = "cpu", precision: str = "auto",
                   batch_size: int = 256, channels_last: bool = True, crop_size: int | None = None,
                   threads: int | None = None) -> Extractor:
    """Build the extractor of ``model_cfg`` for crops of ``channels`` (the order crops must arrive in:
    the checkpoint's own order for ``trained``). Errors are one-line :class:`InputError` s."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    kind = model_cfg.kind
    model_channels = list(channels)
    ckpt_size = None
    if kind == "trained":
        module, preprocess, details, model_channels, ckpt_size = _trained(model_cfg, channels, run)
        hashed = module.model
    elif kind == "random":
        module, preprocess, details = _random(model_cfg, channels)
        hashed = module.model
    elif kind == "imagenet":
        module, details = _imagenet(model_cfg)
        preprocess = None
        hashed = module.features.model
    else:
        raise InputError(f"model.kind {kind!r} has no network", fix="use trained, imagenet or random")
    size = int(crop_size or ckpt_size or 128)
    if kind == "trained" and ckpt_size and crop_size and int(ckpt_size) != int(crop_size):
        raise InputError(f"{details['path']}: the checkpoint was trained on {ckpt_size}-px crops but the crops "
                         f"are {crop_size} px", fix=f"set crops.size={ckpt_size} (and re-run the crops stage)")
    probe = torch.zeros((1, len(model_channels), size, size), dtype=torch.uint8)
    with torch.inference_mode():
        dim = int((module(preprocess(probe)) if preprocess else module(probe)).shape[1])
    per_channel = model_channels if kind == "imagenet" else None
    extra = {"kind": kind, **{k: v for k, v in details.items() if k != "path"}}
    info = ModelInfo(kind=kind, channels=model_channels, dim=dim, feature_names=feature_names(dim, per_channel),
                     fingerprint=fingerprint(hashed, extra), crop_size=size, details=details)
    return Extractor(module, preprocess, info, device=device, precision=precision, batch_size=batch_size,
                     channels_last=channels_last)
