"""Measurements: exact parameter/MAC counts and latency of real modules, and the cost model that predicts them
for any plan."""
from .costmodel import CostModel
from .counting import attention_macs, count_macs, count_params, measure_latency, module_macs

__all__ = ["CostModel", "attention_macs", "count_macs", "count_params", "measure_latency", "module_macs"]
