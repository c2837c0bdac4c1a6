"""Planning: how many and which units each group loses, for an alpha or a params/MACs target, in milliseconds."""
from .plans import ALLOCATIONS, SIGNALS, Plan, plan, sweep

__all__ = ["Plan", "plan", "sweep", "SIGNALS", "ALLOCATIONS"]
