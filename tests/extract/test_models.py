"""The extractors, without a cluster: block6a features of a checkpoint, the random floor, bad models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycp.errors import InputError
from raycp.extract.config import ModelConfig
from raycp.extract.models import load_extractor
from tests.extract.conftest import CHANNELS, make_checkpoint


def test_checkpoint_features_are_the_spatial_mean_of_block6a(checkpoint, real_crops):
    """Paper: features = EfficientNet's block6a_activation (timm blocks.5.0.bn2 output, 672×4×4 at
    128 px) averaged over space; the head never runs."""
    from raycp.models.export import load_model
    from raycp.models.normalize import normalize

    _, crops = real_crops
    ex = load_extractor(ModelConfig(kind="trained", path=str(checkpoint)), CHANNELS, run="unused", batch_size=16)
    feats = ex.features(crops[:20])
    assert feats.shape == (20, 672) and feats.dtype == np.float32
    assert ex.forward_calls == 2  # chunks of 16: 16 + 4
    assert [n for n in ex.info.feature_names[:2]] == ["efn_0000", "efn_0001"]

    model, _ = load_model(str(checkpoint))  # independent: full forward, hook on the module
    grabbed = []
    model.blocks[5][0].bn2.register_forward_hook(lambda m, i, o: grabbed.append(o))
    with torch.inference_mode():
        model(normalize(torch.from_numpy(crops[:20])))
    assert grabbed[0].shape == (20, 672, 4, 4)
    np.testing.assert_allclose(feats, grabbed[0].mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    spread = np.abs(feats[:, None] - feats[None]).max(-1)[~np.eye(20, dtype=bool)].min()
    assert spread > 100 * 1e-5  # cells differ far beyond the tolerance: a mix-up of cells would show


def test_channels_are_put_in_the_checkpoints_order(checkpoint, real_crops):
    _, crops = real_crops
    shuffled = ["Mito", "AGP", "RNA", "ER", "DNA"]
    ex = load_extractor(ModelConfig(kind="trained", path=str(checkpoint)), shuffled, run="unused")
    assert ex.info.channels == CHANNELS  # crops are delivered in the model's order, whatever the index's


def test_random_floor_is_reproducible_from_its_seed(real_crops):
    _, crops = real_crops
    a = load_extractor(ModelConfig(kind="random", seed=3), CHANNELS, run="unused")
    b = load_extractor(ModelConfig(kind="random", seed=3), CHANNELS, run="unused")
    c = load_extractor(ModelConfig(kind="random", seed=4), CHANNELS, run="unused")
    assert a.info.fingerprint == b.info.fingerprint != c.info.fingerprint
    np.testing.assert_array_equal(a.features(crops[:4]), b.features(crops[:4]))


def test_imagenet_baseline_is_five_single_channel_passes_of_672(lite0_weights, real_crops):
    """Paper: each channel alone through an ImageNet EfficientNet, 672 each, concatenated: 3,360."""
    from raycp.extract.imagenet import imagenet_input

    _, crops = real_crops
    ex = load_extractor(ModelConfig(kind="imagenet", path=lite0_weights, arch="efficientnet_lite0"), CHANNELS, run="unused")
    feats = ex.features(crops[:2])
    assert feats.shape == (2, 3360) and ex.info.feature_names[672] == "ER_efn_0000"
    with torch.inference_mode():
        er = ex.module.features(imagenet_input(torch.from_numpy(crops[:2, 1]))).numpy()
    np.testing.assert_allclose(feats[:, 672:1344], er, rtol=1e-5, atol=1e-5)


def test_checkpoint_with_another_number_of_input_channels_is_refused(tmp_path, real_crops):
    three = make_checkpoint(tmp_path / "three", in_chans=3, channels=["DNA", "RNA", "AGP"])
    with pytest.raises(InputError) as err:
        load_extractor(ModelConfig(kind="trained", path=str(three)), CHANNELS, run="unused")
    text = err.value.one_line()
    assert "takes 3 input channels ['DNA', 'RNA', 'AGP']" in text and "has 5" in text and "fix:" in text
    assert "\n" not in text


def test_a_feature_layer_that_does_not_exist_is_refused(checkpoint):
    with pytest.raises(InputError, match="feature layer 'block9z_activation'.*does not exist"):
        load_extractor(ModelConfig(kind="trained", path=str(checkpoint), layer="block9z_activation"), CHANNELS,
                       run="unused")


def test_other_layers_are_selectable_by_name(checkpoint, real_crops):
    _, crops = real_crops
    ex = load_extractor(ModelConfig(kind="trained", path=str(checkpoint), layer="block5c_activation"), CHANNELS,
                        run="unused")
    assert ex.features(crops[:2]).shape == (2, 672)  # block5c: 112 → 672 channels after expansion
    ex = load_extractor(ModelConfig(kind="trained", path=str(checkpoint), layer="blocks.6.0.bn3"), CHANNELS,
                        run="unused")
    assert ex.features(crops[:2]).shape == (2, 320)


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(InputError, match="no model.json"):
        load_extractor(ModelConfig(kind="trained", path=str(tmp_path / "nothing")), CHANNELS, run="unused")


def test_the_imagenet_baseline_has_one_fingerprint_however_often_it_is_loaded(lite0_weights):
    """Its classifier head is freshly initialised at each load; a resumed run must still see the
    same model (issue 12: a run killed during ImageNet extraction could never resume)."""
    cfg = ModelConfig(kind="imagenet", path=lite0_weights, arch="efficientnet_lite0")
    a = load_extractor(cfg, CHANNELS, run="unused")
    b = load_extractor(cfg, CHANNELS, run="unused")
    heads = [m.module.features.model.state_dict()["classifier.weight"] for m in (a, b)]
    assert not torch.equal(*heads)  # what made the fingerprints differ
    assert a.info.fingerprint == b.info.fingerprint
