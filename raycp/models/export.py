"""A trained model's export: ``<output>/train/model/model.safetensors`` + ``model.json`` (arch,
classes, input channel order, crop size, normalisation, feature layer), written by
``raycp train`` and read by extraction, without Ray."""

from __future__ import annotations

import json

from raycp.errors import InputError
from raycp.io import urls

MODEL_FILE, MODEL_JSON = "model.safetensors", "model.json"


def load_model(folder: str):
    """``(model in eval mode, info)`` from an exported folder; ``FeatureModel(model)`` gives the
    block6a features, ``raycp.models.normalize.normalize`` the matching crop normalisation."""
    from safetensors.torch import load as load_safetensors

    from raycp.models.network import create_model

    try:
        info = json.loads(urls.read_bytes(urls.join(folder, MODEL_JSON)))
        tensors = load_safetensors(urls.read_bytes(urls.join(folder, MODEL_FILE)))
    except FileNotFoundError:
        raise InputError(f"{folder}: no {MODEL_JSON} + {MODEL_FILE}", fix="point at <output>/train/model") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{folder}: unreadable trained model ({type(exc).__name__})",
                         fix="re-export it with `raycp train` (it resumes and re-exports)") from None
    model = create_model(info["arch"], num_classes=info["num_classes"], in_chans=info["in_chans"])
    model.load_state_dict(tensors)
    return model.eval(), info
