"""The published Cell Painting CNN in raycp: a Keras (DeepProfiler) weights HDF5 converted to PyTorch
gives Keras' own features, with no TensorFlow here.

The committed fixture ``data/keras_tiny`` was made by ``tests/models/keras_reference.py`` in the
TensorFlow env (``make keras-fixture``): DeepProfiler's exact Keras network (PyPI efficientnet
1.1.1 + pool5 + ClassProb) at width 0.125, depth 0.5, 5 classes, with random values in every
variable, saved with ``save_weights``; and Keras' block6a / pool5 / softmax outputs on 6 crops of
the real 5-channel site (channels DNA, RNA, ER, AGP, Mito; DeepProfiler's 2021–2024
``(x − min)/max`` normalisation done with its TF ops). The full-size B0 comparison is in the slow
tier (``test_full_size_cell_painting_cnn_matches_keras``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from raycp.errors import InputError
from raycp.extract.config import ModelConfig
from raycp.extract.models import load_extractor
from raycp.models.export import import_keras, load_model
from raycp.models.normalize import normalizer

HERE = Path(__file__).parent
TINY = HERE / "data" / "keras_tiny"
REPO = HERE.parents[1]
KERAS_PY = Path(os.environ.get("RAYCP_KERAS_PYTHON", REPO / ".venv-keras" / "bin" / "python"))
MODEL_ORDER = ["DNA", "RNA", "ER", "AGP", "Mito"]
TOLERANCE = 1e-4  # the bound on max |Keras - raycp|



def _features(folder: Path, crops: np.ndarray, layer: str, channels=MODEL_ORDER, **kw) -> np.ndarray:
    ex = load_extractor(ModelConfig(kind="trained", path=str(folder), layer=layer, **kw), list(channels),
                        run="unused", batch_size=4)
    assert ex.info.channels == list(channels)
    return ex.features(crops)


@pytest.mark.parametrize("layer", ["block6a_activation", "pool5"])
def test_the_converted_model_gives_keras_features(keras_imported, keras_expected, layer):
    feats = _features(keras_imported, keras_expected["crops"], layer)
    keras = keras_expected[layer]
    assert feats.shape == keras.shape and feats.dtype == np.float32
    diff = np.abs(feats - keras).max()
    print(f"{layer}: max |raycp - keras| = {diff:.2e} on |features| <= {np.abs(keras).max():.2f}")
    assert diff <= TOLERANCE
    assert np.abs(keras).max() > 0.1 and keras.std(axis=0).max() > 1e-3  # real signal, differing between cells


def test_the_converted_classifier_gives_keras_probabilities(keras_imported, keras_expected):
    model, info = load_model(str(keras_imported))
    x = normalizer(info["normalization"])(torch.from_numpy(keras_expected["crops"]))
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(probs, keras_expected["ClassProb"], atol=1e-6)


def test_model_json_records_the_papers_settings(keras_imported):
    _, info = load_model(str(keras_imported))
    assert info["channels"] == MODEL_ORDER and info["in_chans"] == 5 and info["crop_size"] == 128
    assert info["normalization"]["name"] == "per_crop_channel_min_over_max"
    assert info["arch"] == "tf_efficientnet_b0" and info["arch_args"]["channel_multiplier"] == 0.125
    assert info["num_classes"] == 5 and info["preset"] == "cell_painting_cnn_v1"
    assert len(info["source"]["sha256"]) == 64


def test_a_screen_with_other_channel_names_maps_them(keras_imported, keras_expected):
    """model.channel_map: the model's names -> the screen's; crops arrive in the model's order."""
    mapping = {"DNA": "Hoechst", "RNA": "SYTO14", "ER": "ConA", "AGP": "WGA", "Mito": "MitoTracker"}
    screen = ["Hoechst", "ConA", "SYTO14", "WGA", "MitoTracker"]
    ex = load_extractor(ModelConfig(kind="trained", path=str(keras_imported), channel_map=mapping), screen, run="unused")
    assert ex.info.channels == [mapping[c] for c in MODEL_ORDER]
    assert np.abs(ex.features(keras_expected["crops"]) - keras_expected["block6a_activation"]).max() <= TOLERANCE
    with pytest.raises(InputError, match="channel_map"):  # unmapped: the names differ
        load_extractor(ModelConfig(kind="trained", path=str(keras_imported)), screen, run="unused")
    with pytest.raises(InputError, match=r"names \['Actin'\]"):
        load_extractor(ModelConfig(kind="trained", path=str(keras_imported), channel_map={"Actin": "WGA"}), screen, run="unused")
    with pytest.raises(InputError, match=r"\['ConA'\] twice"):  # two model channels onto one screen channel
        load_extractor(ModelConfig(kind="trained", path=str(keras_imported), channel_map={**mapping, "DNA": "ConA"}),
                       screen, run="unused")
    with pytest.raises(InputError, match=r"takes 5 input channels \['DNA', 'RNA', 'ER', 'AGP', 'Mito'\] \(screen names "
                                         r"after channel_map .*fix: map .* e\.g\. \{RNA: <screen name>\}"):
        load_extractor(ModelConfig(kind="trained", path=str(keras_imported), channel_map={"DNA": "Hoechst", "ER": "ConA",
                                                                                          "AGP": "WGA", "Mito": "MitoTracker"}),
                       screen, run="unused")


def _broken(tmp_path: Path, edit) -> str:
    path = tmp_path / "broken.h5"
    shutil.copy(TINY / "weights.h5", path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return str(path)


def _drop_layer(name):
    def edit(f):
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        f.attrs["layer_names"] = np.array([n.encode() for n in names if n != name], dtype="S")
        del f[name]
    return edit


def _reshape(layer, var):
    def edit(f):
        ds = f[f"{layer}/{layer}/{var}:0"]
        value = ds[()]
        del f[f"{layer}/{layer}/{var}:0"]
        f[f"{layer}/{layer}/{var}:0"] = value[..., :-1]
    return edit


def _nan(layer, var):
    def edit(f):
        ds = f[f"{layer}/{layer}/{var}:0"]
        value = ds[()]
        value.flat[3] = np.nan
        ds[...] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_drop_layer("block3a_dwconv"), "layer block3a_dwconv has no variable 'depthwise_kernel'"),
    (_reshape("block6a_project_conv", "kernel"), r"layer block6a_project_conv variable kernel has shape \(1, 1, 96, 23\), "
                                                 r"tf_efficientnet_b0 expects \(1, 1, 96, 24\) \(Keras layout\)"),
    (_reshape("ClassProb", "bias"), r"ClassProb variable bias has shape \(4,\), tf_efficientnet_b0 expects \(5,\)"),
    (_drop_layer("stem_conv"), "layer stem_conv not found"),
    (_nan("block5b_bn", "moving_variance"), "layer block5b_bn variable moving_variance has 1 NaN or infinite"),
])
def test_a_file_that_does_not_fit_is_refused_naming_the_first_mismatching_layer(tmp_path, edit, message):
    with pytest.raises(InputError, match=message) as err:
        import_keras(_broken(tmp_path, edit), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and "fix:" in str(err.value)
    assert not (tmp_path / "out" / "model.json").exists()


def test_settings_that_do_not_fit_the_file_are_refused(tmp_path):
    with pytest.raises(InputError, match="5 input channels"):
        import_keras(str(TINY / "weights.h5"), str(tmp_path / "a"), channels="DNA,RNA,ER")
    with pytest.raises(InputError, match="normalization 'unit' unknown"):
        import_keras(str(TINY / "weights.h5"), str(tmp_path / "b"), normalization="unit")
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        import_keras(str(TINY / "expected.npz"), str(tmp_path / "c"))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes((TINY / "weights.h5").read_bytes()[:100_000])
    with pytest.raises(InputError, match="not a readable HDF5 file|damaged"):
        import_keras(str(truncated), str(tmp_path / "d"))
    with pytest.raises(InputError, match="is a folder, not a weights file"):
        import_keras(str(TINY), str(tmp_path / "e"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match="output location is not writable"):
        import_keras(str(TINY / "weights.h5"), str(tmp_path / "a-file" / "out"))


def test_the_cli_converts_and_refuses_in_one_line(tmp_path):
    raycp = [sys.executable, "-m", "raycp.cli"]
    ok = subprocess.run([*raycp, "model", "import-keras", str(TINY / "weights.h5"), "-o", str(tmp_path / "m"),
                         "--channels", "raycp"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_model(str(tmp_path / "m"))[1]["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    bad = subprocess.run([*raycp, "model", "import-keras", str(TINY / "expected.npz"), "-o", str(tmp_path / "n")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "expected.npz: not a readable HDF5 file" in bad.stderr


@pytest.mark.slow
def test_full_size_cell_painting_cnn_matches_keras(real_crops_model_order, tmp_path):
    """EfficientNet-B0 at full size (490 classes, the v1 file's shape) with random weights, Keras
    forward vs raycp forward on every croppable cell of the real site: max |diff| <= 1e-4."""
    if not KERAS_PY.exists():
        pytest.skip(f"no TensorFlow env at {KERAS_PY} (make keras-env)")
    crops = tmp_path / "crops.npz"
    np.savez(crops, crops=real_crops_model_order)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([str(KERAS_PY), str(HERE / "keras_reference.py"), str(crops), str(tmp_path / "keras"),
                    "--classes", "490"], check=True, env=env)
    import_keras(str(tmp_path / "keras" / "weights.h5"), str(tmp_path / "cpcnn"))
    keras_expected = dict(np.load(tmp_path / "keras" / "expected.npz"))
    for layer, dim in (("block6a_activation", 672), ("pool5", 1280)):
        feats = _features(tmp_path / "cpcnn", keras_expected["crops"], layer)
        assert feats.shape == (len(real_crops_model_order), dim)
        diff = np.abs(feats - keras_expected[layer]).max()
        print(f"B0 {layer}: {len(feats)} cells, max |raycp - keras| = {diff:.2e}")
        assert diff <= TOLERANCE


@pytest.fixture(scope="module")
def real_crops_model_order(site_5ch):
    from tests.extract.conftest import CHANNELS, site_crops

    table, crops = site_crops(site_5ch)
    keep = ~table["border"].to_numpy(bool)
    return crops[keep][:, [CHANNELS.index(c) for c in MODEL_ORDER]]


def test_normalization_presets_follow_deepprofilers_formulas():
    """Each preset against its formula in numpy, per crop and channel, on 0..255 pixels."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 5, 16, 16), dtype=np.uint8)
    crops[1, 2] = 0  # an all-black channel
    crops[2, 3] = 7  # a flat channel
    x = crops.astype(np.float64)
    lo, hi = x.min(axis=(2, 3), keepdims=True), x.max(axis=(2, 3), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = {
            "per_crop_channel_max": x / (hi + 1e-6),
            "per_crop_channel_min_over_max": np.nan_to_num((x - lo) / hi, nan=0.0),
            "per_crop_channel_min_max": (x - lo) / (hi - lo + 1e-7),
            "per_crop_channel_zscore": (x / 255 - (x / 255).mean(axis=(2, 3), keepdims=True))
            / np.maximum((x / 255).std(axis=(2, 3), keepdims=True), 1e-6),
        }
    for name, value in want.items():
        got = normalizer(name)(torch.from_numpy(crops)).numpy()
        assert got.dtype == np.float32 and np.isfinite(got).all(), name
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert normalizer({"name": "per_crop_channel_zscore"}) is normalizer(None)  # models exported before presets
    with pytest.raises(InputError, match="unknown"):
        normalizer("x/255")


def test_raycp_extract_profiles_a_screen_with_the_imported_model(site_5ch, keras_imported, keras_expected, ray_cluster, tmp_path):
    """`raycp extract` (Ray actors, crops shards in raycp's channel order DNA, ER, RNA, AGP, Mito)
    with the imported model: per-cell features equal Keras' to 1e-4, the preset recorded."""
    import json

    from raycp.extract.config import load_extract_config
    from raycp.extract.pipeline import run_extract
    from raycp.extract.writers import read_cells
    from tests.extract.conftest import CHANNELS, PLATE, RAY, real_index, save_index, site_crops, write_crops_shards

    table, _ = site_crops(site_5ch)
    crops = keras_expected["crops"][:, [MODEL_ORDER.index(c) for c in CHANNELS]]  # the shards' order
    index = real_index(site_5ch)
    write_crops_shards(tmp_path / "run", index, table.iloc[: len(crops)], crops)
    cfg = load_extract_config(None, [*RAY, "model.kind=trained", f"model.path={keras_imported}", "model.name=cpcnn",
                                     "inference.batch_size=4"], index=save_index(index, tmp_path),
                              output=str(tmp_path / "run"))
    result = run_extract(cfg)
    assert result.summary["processed"] == 1 and result.summary["quarantined"] == 0
    _, feats, names = read_cells(str(tmp_path / "run" / "features" / "cpcnn" / "cells" / PLATE / "C03_3.parquet"))
    assert feats.shape == keras_expected["block6a_activation"].shape
    assert np.abs(feats - keras_expected["block6a_activation"]).max() <= TOLERANCE
    written = json.loads((tmp_path / "run" / "features" / "cpcnn" / "model.json").read_text())
    assert written["channels"] == MODEL_ORDER and written["normalization"]["name"] == "per_crop_channel_min_over_max"

