"""Pruning: applying a plan by physical surgery (``prune``) or zeroing (``mask``), and saving/loading the result."""
from .io import load, save
from .surgery import example_from_plan, mask, prune

__all__ = ["prune", "mask", "save", "load", "example_from_plan"]
