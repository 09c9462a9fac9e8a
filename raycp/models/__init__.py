"""The Cell Painting CNN as a model, apart from how it is trained: timm EfficientNets with the
paper's 5 input channels and ImageNet initialisation (:mod:`~raycp.models.network`), the crop
normalisation (:mod:`~raycp.models.normalize`) and the exported checkpoint
(:mod:`~raycp.models.export`). No Ray: training (``raycp.train``) and extraction
(``raycp.extract``) both build on it."""
