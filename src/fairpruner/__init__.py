"""fairpruner: FAIR-Pruner structured pruning (U-Score, R-Score, Tolerance of Difference)."""
from ._errors import DataError, FairPrunerError, PlanError, UnsupportedModelError
from ._scores import GroupScores, Scores
from ._scoring import score

__version__ = "0.1.0"
