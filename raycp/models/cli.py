"""``raycp model ...``: models apart from training. ``import-keras`` converts a Keras/DeepProfiler
Cell Painting CNN (e.g. the paper's ``Cell_Painting_CNN_v1.hdf5``) into raycp's model export, so
``raycp extract``, ``raycp run`` feature sets and ``raycp train`` (``train.model.init``) use it.
No TensorFlow is needed. Registered by the main CLI as ``raycp model``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(help="Import and inspect Cell Painting CNN models (no TensorFlow needed).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.command("import-keras")
def import_keras(
    file: Annotated[str, typer.Argument(help="Keras weights HDF5 (save_weights), e.g. Cell_Painting_CNN_v1.hdf5")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder to write model.safetensors + model.json")],
    preset: Annotated[str, typer.Option(help="published model whose settings to record (cell_painting_cnn_v1), or none")] = "cell_painting_cnn_v1",
    channels: Annotated[Optional[str], typer.Option(help="input channel order: a preset (deepprofiler = DNA,RNA,ER,AGP,Mito; "
                                                          "raycp = DNA,ER,RNA,AGP,Mito) or names, comma-separated")] = None,
    normalization: Annotated[Optional[str], typer.Option(help="crop normalization preset (per_crop_channel_min_over_max, "
                                                               "per_crop_channel_min_max, per_crop_channel_max, per_crop_channel_zscore)")] = None,
    crop_size: Annotated[Optional[int], typer.Option(help="crop side in pixels the model was trained on (preset: 128)")] = None,
) -> None:
    """Convert FILE into OUTPUT (model.safetensors + model.json); refuses a file that is not
    DeepProfiler's EfficientNet, naming the first layer that does not fit."""
    from raycp.console import console
    from raycp.models.export import import_keras as run_import

    info = run_import(file, output, preset=None if preset == "none" else preset, channels=channels,
                      normalization=normalization, crop_size=crop_size)
    size = "" if not info["arch_args"] else f" {info['arch_args']}"
    classes = f"{info['num_classes']} classes" if info["num_classes"] else "no classifier in the file (features only)"
    console().print(f"{output}: {info['arch']}{size} · {info['in_chans']} channels {','.join(info['channels'])} · "
                    f"{classes} · crops {info['crop_size']} px · normalization "
                    f"{info['normalization']['name']} · features block6a_activation and pool5 · "
                    f"sha256 {info['source']['sha256'][:12]}", markup=False, soft_wrap=True)
