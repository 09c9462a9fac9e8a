"""Feature extraction for whole screens (paper Methods, "Feature extraction")."""
