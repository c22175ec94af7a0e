"""RCPU Explorer: structured pruning with rotation-constrained compensation."""

from .export import load_pruned

__all__ = ["load_pruned"]
