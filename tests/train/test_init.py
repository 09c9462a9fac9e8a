"""Fine-tuning from an exported or imported model (train.model.init): the published Cell Painting
CNN's Keras weights (the committed width-0.125 fixture of tests/models) as the start of training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crops_helper import train_cfg

from raycp.models.export import load_model

MODEL_ORDER = ["DNA", "RNA", "ER", "AGP", "Mito"]
TOLERANCE = 1e-4


def test_the_imported_model_initialises_fine_tuning(keras_imported, keras_expected, crops64, ray_cluster, tmp_path):
    """train.model.init: the imported network, stem permuted to the crops' channel order (DNA, ER,
    RNA, AGP, Mito), its normalisation kept: before any step it gives the imported model's
    features; `raycp train` fine-tunes it and exports a model that records where it came from."""
    from raycp.models.network import FeatureModel
    from raycp.train import trainer
    from raycp.train.loop import Recipe

    cfg = train_cfg(crops64, tmp_path / "ft", model={"arch": "tf_efficientnet_b0", "init": str(keras_imported)},
                    optim={"epochs": 1}, compute={"num_workers": 1, "cpus_per_worker": 1, "max_steps_per_epoch": 2})
    info = trainer.check_init(cfg)
    tensors = trainer.init_tensors(cfg, info)
    assert trainer.resolved_normalization(cfg, info) == "per_crop_channel_min_over_max"
    recipe = Recipe(cfg, 6, arch_args=info["arch_args"], normalization="per_crop_channel_min_over_max")
    start = recipe.model(init=tensors).eval()
    raycp_order = ["DNA", "ER", "RNA", "AGP", "Mito"]
    crops = torch.from_numpy(keras_expected["crops"][:, [MODEL_ORDER.index(c) for c in raycp_order]])
    with torch.inference_mode():
        feats = FeatureModel(start)(recipe.normalize(crops)).numpy()
    assert np.abs(feats - keras_expected["block6a_activation"]).max() <= TOLERANCE

    res = trainer.fit(cfg)
    model, exported = load_model(res.model_dir)
    assert exported["normalization"]["name"] == "per_crop_channel_min_over_max"
    assert exported["arch_args"] == info["arch_args"] and exported["init"]["path"] == str(keras_imported)
    assert exported["num_classes"] == len(res.classes) == 6
    with pytest.raises(Exception, match="set train.model.arch=tf_efficientnet_b0"):
        trainer.check_init(train_cfg(crops64, tmp_path / "x", model={"init": str(keras_imported)}))


def test_a_run_fine_tunes_its_init_rather_than_imagenet(keras_imported):
    """`raycp run` passes its ImageNet file to training unless the CNN starts from train.model.init
    (both at once are refused by the train config)."""
    from raycp.config import build_config
    from raycp.run.config import PipelineConfig

    cfg = build_config(PipelineConfig, None, ["data.index=x/sites.parquet", "data.output=x", "imagenet_weights=w.pth",
                                              "train.model.arch=tf_efficientnet_b0", f"train.model.init={keras_imported}"])
    tcfg = cfg.train_config()
    assert tcfg.model.init == str(keras_imported) and tcfg.model.imagenet_weights is None
    plain = build_config(PipelineConfig, None, ["data.index=x/sites.parquet", "data.output=x", "imagenet_weights=w.pth"])
    assert plain.train_config().model.imagenet_weights == "w.pth"


def test_init_mistakes_name_their_key_and_are_caught_by_a_dry_run(keras_imported, crops64, tmp_path):
    """Config errors name model.init / model.normalization (not the whole section), and an init that
    does not fit is refused by `prepare` (what `raycp train --dry-run` runs), before any training."""
    from raycp.config import build_config
    from raycp.errors import ConfigError, InputError
    from raycp.train import trainer
    from raycp.train.config import TrainConfig

    base = [f"crops={crops64}", f"output={tmp_path}"]
    with pytest.raises(ConfigError, match=r"model\.init.*exclusive") as err:
        build_config(TrainConfig, None, [*base, f"model.init={keras_imported}", "model.imagenet_weights=w.pth"])
    assert "--set model=" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.normalization.*'bogus' unknown") as err:
        build_config(TrainConfig, None, [*base, "model.normalization=bogus"])
    assert "--set model=" not in str(err.value)
    with pytest.raises(ConfigError, match="set train.model.arch=tf_efficientnet_b0"):
        trainer.prepare(train_cfg(crops64, tmp_path, model={"init": str(keras_imported)}))
    with pytest.raises(InputError, match="no model.json"):
        trainer.prepare(train_cfg(crops64, tmp_path, model={"init": str(tmp_path / "nope"),
                                                             "arch": "tf_efficientnet_b0"}))
