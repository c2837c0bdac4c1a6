"""The torch-pruning adapter: builds its dependency graph and reads coupled groups out of it.

Groups (see :mod:`fairpruner._core.groups`) are rooted at Conv/Linear layers; the unit families handed in
(never looked up from here) add their own pruners, tracing hooks, parameter layouts and groups, as
torch-pruning itself takes ``customized_pruners``. ``tracing`` builds the graph; ``groups`` reads the groups.
"""
from .groups import discover_groups, group_slots
from .tracing import GRAPH_SECONDS, SECONDS_ENV, build_graph, family_layout, find_output_layers

__all__ = ["build_graph", "discover_groups", "find_output_layers", "group_slots", "family_layout",
           "GRAPH_SECONDS", "SECONDS_ENV"]
