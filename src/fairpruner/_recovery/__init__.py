"""Recovery after pruning: BatchNorm recalibration, evaluation and a short fine-tuning loop."""
from .recalibration import recalibrate, tracked_norms
from .training import evaluate, finetune, native_cpu_autocast

__all__ = ["evaluate", "finetune", "native_cpu_autocast", "recalibrate", "tracked_norms"]
