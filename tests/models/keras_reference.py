"""The Keras side of the Cell Painting CNN import test: runs in the TensorFlow env only
(``make keras-env``: tensorflow-cpu + tf-keras + PyPI ``efficientnet`` 1.1.1, pinned in
``requirements/keras.txt``), never inside raycp.

It builds DeepProfiler's model exactly (``plugins/models/efficientnet.py``: ``efficientnet.tfkeras``
EfficientNet without top + ``GlobalAveragePooling2D(name="pool5")`` + ``Dense(classes, softmax,
name="ClassProb")``), gives every variable random values (BatchNorm statistics included, so a
mis-mapped tensor cannot hide behind Keras' gamma=1/beta=0/mean=0/var=1 defaults), writes them with
``save_weights`` to HDF5 as DeepProfiler does, normalises the crops with DeepProfiler's own TF ops
and saves the Keras outputs.

    TF_USE_LEGACY_KERAS=1 .venv-keras/bin/python tests/models/keras_reference.py crops.npz OUT \
        [--width 1.0 --depth 1.0 --classes 490 --normalization per_crop_channel_min_over_max --seed 0]

``crops.npz``: ``crops`` N×C×S×S uint8 in the model's channel order. ``OUT/weights.h5`` and
``OUT/expected.npz`` (``block6a_activation`` N×672 spatial mean, ``pool5`` N×1280, ``ClassProb``
N×classes, float32; the crops copied in).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def deepprofiler_normalize(tf, crops, name: str):
    """DeepProfiler's ``crop_graph`` normalisation over NHWC float crops of 0..255 values, per crop and channel.
    Each branch is the code of one DeepProfiler era (commit in the comment)."""
    if name == "per_crop_channel_max":  # beae57c (2019-09) .. ccfc54a (2020-05)
        return crops / (tf.reduce_max(crops, axis=[1, 2], keepdims=True) + 1e-6)
    if name == "per_crop_channel_zscore":  # ccfc54a (2020-05) .. 66f2037 (2021-09); raycp divides by 255 first
        x = crops / 255.0
        mean = tf.math.reduce_mean(x, axis=[1, 2], keepdims=True)
        std = tf.math.reduce_std(x, axis=[1, 2], keepdims=True)
        return (x - mean) / tf.maximum(std, 1e-6)
    mini = tf.math.reduce_min(crops, axis=[1, 2], keepdims=True)
    maxi = tf.math.reduce_max(crops, axis=[1, 2], keepdims=True)
    if name == "per_crop_channel_min_over_max":  # 66f2037 (2021-09) .. 08aa86a (2024-08)
        return (crops - mini) / maxi
    if name == "per_crop_channel_min_max":  # 08aa86a (2024-08) on
        return (crops - mini) / (maxi - mini + tf.keras.backend.epsilon())
    raise SystemExit(f"unknown normalization {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crops")
    parser.add_argument("out")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--depth", type=float, default=1.0)
    parser.add_argument("--classes", type=int, default=490)
    parser.add_argument("--normalization", default="per_crop_channel_min_over_max")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import efficientnet.model as efn_model
    import efficientnet.tfkeras  # noqa: F401  (binds efficientnet's backend to tf.keras)
    import numpy as np
    import tensorflow as tf

    keras = tf.keras
    crops = np.load(args.crops)["crops"]
    n, c, s, _ = crops.shape
    tf.keras.utils.set_random_seed(args.seed)
    kw = {"backend": keras.backend, "layers": keras.layers, "models": keras.models, "utils": keras.utils}
    base = efn_model.EfficientNet(args.width, args.depth, 224, 0.2, model_name="efficientnet-custom",
                                  include_top=False, weights=None, input_shape=(s, s, c), **kw)
    features = keras.layers.GlobalAveragePooling2D(name="pool5")(base.layers[-1].output)
    probs = keras.layers.Dense(args.classes, activation="softmax", name="ClassProb")(features)
    model = keras.Model(base.input, probs)

    rng = np.random.default_rng(args.seed)
    for layer in model.layers:
        values = []
        for var in layer.weights:
            shape, name = tuple(var.shape), var.name.rsplit("/", 1)[-1].split(":")[0]
            if name in ("gamma", "moving_variance"):
                values.append(rng.uniform(0.5, 1.5, shape))
            elif name in ("beta", "moving_mean", "bias"):
                values.append(rng.normal(0.0, 0.1, shape))
            else:  # kernels: He-scaled so activations neither vanish nor explode through 16 blocks
                fan_in = int(np.prod(shape[:-1])) if name != "depthwise_kernel" else int(np.prod(shape[:2]))
                values.append(rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape))
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(out / "weights.h5"))

    x = tf.constant(np.transpose(crops, (0, 2, 3, 1)).astype(np.float32))
    x = deepprofiler_normalize(tf, x, args.normalization)
    probe = keras.Model(model.input, [model.get_layer("block6a_activation").output,
                                      model.get_layer("pool5").output, model.output])
    block6a, pool5, prob = probe.predict(x, verbose=0, batch_size=16)
    np.savez_compressed(out / "expected.npz", crops=crops, block6a_activation=block6a.mean(axis=(1, 2)).astype(np.float32),
                        pool5=pool5.astype(np.float32), ClassProb=prob.astype(np.float32),
                        normalization=np.array(args.normalization), width=np.array(args.width),
                        depth=np.array(args.depth))
    print(f"{out}: {len(model.layers)} layers, block6a {block6a.shape}, pool5 {pool5.shape}, probs {prob.shape}")


if __name__ == "__main__":
    main()
