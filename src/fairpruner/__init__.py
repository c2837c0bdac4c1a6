"""fairpruner: FAIR-Pruner structured pruning (U-Score, R-Score, Tolerance of Difference).

The data path: :func:`score` (one pass over labelled calibration data) -> :func:`plan` (ToD counts for an
alpha or a params/MACs target, milliseconds) -> :func:`prune` (physical surgery) / :func:`mask` (zeroing)
-> :func:`save` / :func:`load`.
"""
from ._counting import count_macs, count_params, measure_latency
from ._errors import DataError, FairPrunerError, PlanError, UnsupportedModelError
from ._finetune import evaluate, finetune
from ._plan import ALLOCATIONS, SIGNALS, Plan, plan, sweep
from ._report import Report, format_sweep, plot_sweep, report
from ._scores import GroupScores, Scores
from ._scoring import score
from ._surgery import load, mask, prune, save
from ._recurrent import RecurrentStack  # registers the recurrent family (LSTM, GRU, RNN hidden units)
from ._experts import moe_routers  # registers the mixture-of-experts family
from . import _huggingface  # registers the Hugging Face attention-head family (never imports transformers)
del _huggingface
from ._attention import PrunedMultiheadAttention  # registers the attention-head family (timm style, nn.MultiheadAttention)

__version__ = "0.1.0"

__all__ = [
    "score", "plan", "sweep", "prune", "mask", "save", "load",
    "Scores", "GroupScores", "Plan", "SIGNALS", "ALLOCATIONS",
    "count_macs", "count_params", "measure_latency",
    "evaluate", "finetune", "report", "Report", "format_sweep", "plot_sweep",
    "FairPrunerError", "UnsupportedModelError", "DataError", "PlanError",
    "moe_routers",
    "PrunedMultiheadAttention",
    "RecurrentStack",
]
