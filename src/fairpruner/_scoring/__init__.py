"""Scoring: the one pass over calibration data that gives every unit its U- and R-Score."""
from .run import R_REDUCTIONS, U_REDUCTIONS, U_SITES, score
from .scores import GroupScores, Scores
from .sites import site_seed

__all__ = ["score", "Scores", "GroupScores", "U_SITES", "U_REDUCTIONS", "R_REDUCTIONS", "site_seed"]
