"""raycp: Ray-based scale-out image-based profiling of Cell Painting screens.

Implements the pipeline of Moshkov et al. 2024 ("Learning representations for image-based
profiling of perturbations"). Importing this package imports neither ray nor torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
