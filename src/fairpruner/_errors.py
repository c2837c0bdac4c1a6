"""Exceptions raised by fairpruner; each message says what is wrong and what to do."""

__all__ = ["FairPrunerError", "UnsupportedModelError", "DataError", "PlanError", "TargetError", "CliError"]


class FairPrunerError(ValueError):
    """Base class of every error fairpruner raises on bad input."""


class UnsupportedModelError(FairPrunerError):
    """The model holds a layer or an operation that cannot be pruned safely."""


class DataError(FairPrunerError):
    """The calibration data cannot be scored (labels, classes, non-finite values)."""


class PlanError(FairPrunerError):
    """A plan or a target that cannot be made, met, or applied to this model."""


class TargetError(PlanError):
    """A params or MACs target beyond what one round of pruning can remove; the message names the most it can."""


class CliError(FairPrunerError):
    """A command-line input that cannot be used; printed as ``error: <message>``."""
