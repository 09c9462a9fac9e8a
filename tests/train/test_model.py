"""The paper's network: EfficientNet with 5 channels, ImageNet init, block6a features (672-d)."""

from __future__ import annotations

import pytest
import torch

from raycp.errors import InputError
from raycp.models.network import (
    FeatureModel,
    create_model,
    expand_stem,
    load_imagenet_init,
    read_state_dict,
    resolve_layer,
)


def test_block6a_activation_is_672x4x4_at_128px():
    model = create_model("efficientnet_b0", num_classes=7).eval()
    feats = FeatureModel(model)
    assert feats.layer == "blocks.5.0.bn2"
    x = torch.randn(3, 5, 128, 128)
    with torch.inference_mode():
        assert feats.feature_map(x).shape == (3, 672, 4, 4)
        out = feats(x)
    assert out.shape == (3, 672) and out.dtype == torch.float32


def test_forward_is_truncated_at_the_feature_layer():
    model = create_model("efficientnet_b0", num_classes=3).eval()
    calls = []
    model.conv_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        FeatureModel(model)(torch.randn(1, 5, 128, 128))
    assert calls == []  # the head never runs


def test_keras_layer_names():
    assert resolve_layer("block6a_activation") == "blocks.5.0.bn2"
    assert resolve_layer("block6a_expand_activation") == "blocks.5.0.bn1"
    assert resolve_layer("block1a_activation") == "blocks.0.0.bn1"
    assert resolve_layer("blocks.4.2.bn2") == "blocks.4.2.bn2"
    with pytest.raises(InputError, match="feature layer 'block9z_activation'"):
        FeatureModel(create_model(num_classes=2), "block9z_activation")


def test_imagenet_init_copies_all_but_stem_and_replicates_rgb(lite0_weights):
    src = read_state_dict(lite0_weights)
    assert len(src) == 296
    model = load_imagenet_init(create_model("efficientnet_lite0", num_classes=11), lite0_weights)
    sd = model.state_dict()
    rgb = src["_conv_stem.weight"]
    stem = sd["conv_stem.weight"]
    assert stem.shape == (32, 5, 3, 3)
    for ch, src_ch in enumerate((0, 1, 2, 0, 1)):  # R,G,B,R,G
        assert torch.equal(stem[:, ch], rgb[:, src_ch])
    assert torch.equal(sd["blocks.5.0.conv_dw.weight"], src["_blocks.11._depthwise_conv.weight"])
    assert sd["classifier.weight"].shape == (11, 1280)
    timm_stem = expand_stem(rgb, 5, mode="timm")
    assert timm_stem.shape == (32, 5, 3, 3) and not torch.equal(timm_stem, stem)


def test_wrong_weights_are_refused(tmp_path, lite0_weights):
    with pytest.raises(InputError, match="weights do not match the architecture"):
        load_imagenet_init(create_model("efficientnet_b0", num_classes=2), lite0_weights)
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable weights file"):
        read_state_dict(bad)


def test_classifier_starts_near_chance_with_the_keras_init(lite0_weights, crops64):
    """Issue 16: timm's EfficientNet classifier init, U(±1/√classes), gives an ImageNet-initialised
    model logits of std ≈ 4 and a cross-entropy far above chance on real crops; the paper's Keras
    Dense (Glorot-uniform, zero bias), raycp's default, starts near chance (ln K)."""
    import math

    import torch.nn.functional as F
    from crops_helper import read_crops

    from raycp.models.normalize import normalize

    x, y = read_crops(crops64, 128)
    k = int(y.max()) + 1
    losses = {}
    for head in ("keras", "timm"):
        torch.manual_seed(0)
        model = load_imagenet_init(create_model("efficientnet_lite0", num_classes=k, head_init=head), lite0_weights)
        fc = model.get_classifier()
        if head == "keras":
            assert fc.weight.abs().max() <= math.sqrt(6 / (1280 + k)) and not fc.bias.any()
        with torch.no_grad():
            losses[head] = F.cross_entropy(model.eval()(normalize(x)), y).item()
    assert losses["keras"] < math.log(k) + 0.5 < losses["timm"], losses
    with pytest.raises(InputError, match="classifier init 'glorot' unknown"):
        create_model("efficientnet_lite0", num_classes=k, head_init="glorot")
