"""Weakly supervised learning of the Cell Painting CNN (paper Methods, "Weakly supervised learning")."""
