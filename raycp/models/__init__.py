"""The Cell Painting CNN as a model, apart from how it is trained: timm EfficientNets with the
paper's 5 input channels and ImageNet initialisation (:mod:`~raycp.models.network`), the crop
normalisation presets (:mod:`~raycp.models.normalize`), the exported model folder
(:mod:`~raycp.models.export`) and the import of the published Keras/DeepProfiler model
(:mod:`~raycp.models.keras_import`, ``raycp model import-keras``). No Ray: training
(``raycp.train``) and extraction (``raycp.extract``) both build on it."""
