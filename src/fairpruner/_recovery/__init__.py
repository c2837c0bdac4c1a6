"""Recovery after pruning: BatchNorm recalibration, evaluation and a short fine-tuning loop."""
from .recalibration import recalibrate, tracked_norms
from .training import evaluate, finetune

__all__ = ["evaluate", "finetune", "recalibrate", "tracked_norms"]
