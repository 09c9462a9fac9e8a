"""A model's export: ``model.safetensors`` + ``model.json`` (arch, classes, input channel order, crop
size, normalisation preset, feature layers), written by ``raycp train`` (``<output>/train/model``)
and ``raycp model import-keras``, read by extraction and as a fine-tuning init, without Ray."""

from __future__ import annotations

import json

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.index import DEFAULT_CHANNELS

MODEL_FILE, MODEL_JSON = "model.safetensors", "model.json"

#: named channel orders of a model's input (``model.json`` ``channels``)
CHANNEL_PRESETS = {
    # the paper's DeepProfiler configs (BBBC022, CDRP, TA-ORF, Cell Painting CNN v1): images.channels
    "deepprofiler": ["DNA", "RNA", "ER", "AGP", "Mito"],
    # raycp's index order
    "raycp": list(DEFAULT_CHANNELS),
}

#: what ``raycp model import-keras`` records for a known published model
MODEL_PRESETS = {
    "cell_painting_cnn_v1": {
        "channels": "deepprofiler", "normalization": "per_crop_channel_min_over_max", "crop_size": 128,
        "source": "Moshkov et al. 2024, Zenodo record 7114558, Cell_Painting_CNN_v1.hdf5 (JUMP cpcnn_zenodo_7114558)",
    },
}


def write_model(folder: str, tensors: dict, info: dict) -> dict:
    """Write ``model.safetensors`` (float32 tensors) and ``model.json`` atomically; returns ``info``."""
    from safetensors.torch import save as save_safetensors

    tensors = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}
    urls.atomic_write_bytes(urls.join(folder, MODEL_FILE), save_safetensors(tensors, metadata={"format": "pt"}))
    urls.atomic_write_text(urls.join(folder, MODEL_JSON), json.dumps(info, indent=2))
    return info


def read_model_json(folder: str) -> dict:
    """The ``model.json`` of an exported folder; :class:`InputError` when absent or unreadable."""
    try:
        return json.loads(urls.read_bytes(urls.join(folder, MODEL_JSON)))
    except FileNotFoundError:
        raise InputError(f"{folder}: no {MODEL_JSON} + {MODEL_FILE}",
                         fix="point at <output>/train/model or a folder written by `raycp model import-keras`") from None
    except ValueError:
        raise InputError(f"{folder}/{MODEL_JSON}: not JSON", fix="re-export the model") from None


def load_model(folder: str):
    """``(model in eval mode, info)`` from an exported folder; ``FeatureModel(model)`` gives the
    block6a features, ``raycp.models.normalize.normalizer(info["normalization"])`` the matching
    crop normalisation."""
    from safetensors.torch import load as load_safetensors

    from raycp.models.network import create_model

    info = read_model_json(folder)
    try:
        tensors = load_safetensors(urls.read_bytes(urls.join(folder, MODEL_FILE)))
    except FileNotFoundError:
        raise InputError(f"{folder}: no {MODEL_FILE}", fix="point at <output>/train/model") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{folder}: unreadable trained model ({type(exc).__name__})",
                         fix="re-export it with `raycp train` (it resumes and re-exports)") from None
    model = create_model(info["arch"], num_classes=info["num_classes"], in_chans=info["in_chans"],
                         arch_args=info.get("arch_args") or None)
    model.load_state_dict(tensors)
    return model.eval(), info


def import_keras(path: str, folder: str, *, preset: str | None = "cell_painting_cnn_v1", channels=None,
                 normalization: str | None = None, crop_size: int | None = None) -> dict:
    """Convert a Keras/DeepProfiler weights HDF5 (:mod:`raycp.models.keras_import`) into an export
    folder that works wherever a trained model does; returns its ``model.json``.

    ``preset`` fills the channel order, normalisation and crop size of a published model
    (:data:`MODEL_PRESETS`); ``channels`` (a :data:`CHANNEL_PRESETS` name or a list, one name per
    input channel), ``normalization`` (a :data:`raycp.models.normalize.PRESETS` name) and
    ``crop_size`` override it. Raises :class:`InputError` for a file that does not convert or
    settings that do not fit it."""
    from raycp import __version__
    from raycp.models.keras_import import convert, read_keras_weights
    from raycp.models.network import DEFAULT_LAYER, resolve_layer
    from raycp.models.normalize import PRESETS, normalizer

    if preset is not None and preset not in MODEL_PRESETS:
        raise InputError(f"model preset {preset!r} unknown", fix=f"use one of {', '.join(MODEL_PRESETS)} or none")
    base = MODEL_PRESETS.get(preset or "", {})
    chans = channels if channels is not None else base.get("channels", "deepprofiler")
    if isinstance(chans, str):
        if chans not in CHANNEL_PRESETS:
            chans = [c.strip() for c in chans.split(",") if c.strip()]
        else:
            chans = CHANNEL_PRESETS[chans]
    chans = list(chans)
    norm = normalization or base.get("normalization") or "per_crop_channel_zscore"
    normalizer(norm)  # an unknown preset is an InputError, before the file is read
    urls.ensure_writable(folder)  # before the (large) file is read
    weights = read_keras_weights(path)
    model, geometry = convert(weights)
    if len(chans) != geometry.in_chans or len(set(chans)) != len(chans):
        raise InputError(f"{path}: the model takes {geometry.in_chans} input channels, the channel order given is {chans}",
                         fix=f"pass --channels with {geometry.in_chans} distinct names in the model's input order")
    info = {
        "format": "raycp.keras_import/1",
        "arch": geometry.arch,
        "arch_args": geometry.arch_args,
        "num_classes": geometry.num_classes,
        "classes": None,
        "channels": chans,
        "in_chans": geometry.in_chans,
        "crop_size": int(crop_size or base.get("crop_size") or 128),
        "normalization": PRESETS[norm],
        "feature_layer": DEFAULT_LAYER,
        "feature_layers": {name: resolve_layer(name) for name in (DEFAULT_LAYER, "pool5")},
        "preset": preset,
        "source": {"file": path.rsplit("/", 1)[-1], "sha256": weights.sha256, "format": "keras save_weights HDF5",
                   "network": "PyPI efficientnet 1.1.1 + pool5 + ClassProb (DeepProfiler)",
                   "about": base.get("source")},
        "raycp_version": __version__,
    }
    return write_model(folder, model.state_dict(), info)
