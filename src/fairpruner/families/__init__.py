"""Unit families: the extension point for units torch-pruning's dependency graph cannot express.

A new kind of unit is one subclass of :class:`Family` with three required methods (``discover``,
``u_sources``, ``prune_``), registered with the :func:`register` decorator; scoring, planning, masking, the
cost model and the pruned == masked check then handle it like every built-in. See :class:`Family` for a
worked example and ``docs/architecture.md`` for where it plugs into the data path.

The built-in families, registered in this order (the first explicit parameter layout wins):
recurrent hidden units, mixture-of-experts experts, stacked experts (transformers 5's Mixtral, Qwen2-MoE) and
the hidden units inside them,
attention heads, Hugging Face attention heads, GPT-2-style Conv1D blocks, fused gated MLPs (Phi-3),
LeViT heads.
"""
from .._core.groups import GroupSpec, MacsTerm, Member, member_params, zero_members_
from .._core.layers import kept, replace_module, slice_linear_
from .base import (Family, FamilyOptions, USource, build, hook_source, options_record, register, registered,
                   unregister)
from .recurrent import RecurrentFamily, RecurrentStack
from .experts import Experts, moe_routers
from .experts_fused import StackedExperts
from .experts_fused_units import StackedExpertUnits
from .attention_hf import HFAttentionHeads
from .conv1d_hf import Conv1DBlocks
from .mlp_fused import FusedGatedMLP
from .attention_levit import LevitHeads
from .attention import ATTENTION_UNITS, AttentionHeads, AttentionOptions, for_attention_families
from .pruned_mha import PrunedMultiheadAttention

__all__ = [
    "Family", "FamilyOptions", "USource", "MacsTerm", "GroupSpec", "Member", "register", "unregister",
    "registered", "build", "options_record", "hook_source", "member_params", "zero_members_",
    "kept", "replace_module", "slice_linear_",
    "RecurrentFamily", "RecurrentStack", "Experts", "StackedExperts", "StackedExpertUnits", "moe_routers",
    "HFAttentionHeads", "Conv1DBlocks", "FusedGatedMLP", "LevitHeads", "AttentionHeads",
    "AttentionOptions", "ATTENTION_UNITS", "for_attention_families", "PrunedMultiheadAttention",
]
