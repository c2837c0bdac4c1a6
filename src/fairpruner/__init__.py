"""fairpruner: FAIR-Pruner structured pruning (U-Score, R-Score, Tolerance of Difference).

The data path, one sub-package each: :func:`score` (``_scoring``: one pass over labelled calibration data)
-> :func:`plan` (``_planning``: ToD counts for an alpha or a params/MACs target, milliseconds) -> :func:`prune`
/ :func:`mask` (``_pruning``) -> :func:`recalibrate` / :func:`finetune` (``_recovery``) -> :func:`report`
(``_reporting``). The extension point is :mod:`fairpruner.families` (unit kinds the dependency graph cannot express).
"""
from . import families
from ._errors import CliError, DataError, FairPrunerError, PlanError, TargetError, UnsupportedModelError
from ._measure.counting import count_macs as count_macs, count_params as count_params
from ._measure.counting import measure_latency as measure_latency
from ._planning import ALLOCATIONS as ALLOCATIONS, SIGNALS as SIGNALS, Plan as Plan, plan as plan, sweep as sweep
from ._pruning import load as load, mask as mask, prune as prune, save as save
from ._recovery import evaluate as evaluate, finetune as finetune, recalibrate as recalibrate
from ._reporting import Report as Report, format_plan as format_plan, format_sweep as format_sweep
from ._reporting import plot_sweep as plot_sweep, report as report
from ._scoring import GroupScores as GroupScores, Scores as Scores, score as score
from .families import PrunedMultiheadAttention as PrunedMultiheadAttention
from .families import RecurrentStack as RecurrentStack, moe_routers as moe_routers

__version__ = "0.1.0"

__all__ = [
    "score", "plan", "sweep", "prune", "mask", "save", "load",
    "Scores", "GroupScores", "Plan", "SIGNALS", "ALLOCATIONS",
    "count_macs", "count_params", "measure_latency",
    "evaluate", "finetune", "recalibrate", "report", "Report", "format_plan", "format_sweep", "plot_sweep",
    "FairPrunerError", "UnsupportedModelError", "DataError", "PlanError", "TargetError", "CliError",
    "families", "moe_routers", "PrunedMultiheadAttention", "RecurrentStack",
]
