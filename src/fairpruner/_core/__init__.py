"""The data model and the torch conventions every stage shares; imports nothing of fairpruner but its errors."""
from .files import read_torch_file
from .groups import GroupSpec, MacsTerm, Member, member_kind, member_params, zero_members_
from .inputs import (as_args, check_device, describe_inputs, device_of, first_sample, float_dtype, forward_logits,
                     length_of,
                     logits_of, model_device, output_tensors, split_batch, synthetic_inputs, to_device)
from .layers import (CONV_TYPES, FROZEN_TYPES, NORM_TYPES, SUPPORTED_TYPES, UNSUPPORTED_HINTS, WEIGHT_TYPES,
                     freezes, kept, qualname, replace_module, slice_linear_, slice_param_)
from .state import eval_mode, model_signature, preserved_modes, preserved_state

__all__ = [
    "read_torch_file", "GroupSpec", "MacsTerm", "Member", "member_kind", "member_params", "zero_members_",
    "as_args", "check_device", "describe_inputs", "device_of", "first_sample", "float_dtype", "forward_logits",
    "length_of",
    "logits_of", "model_device", "output_tensors", "split_batch", "synthetic_inputs", "to_device",
    "CONV_TYPES", "FROZEN_TYPES", "NORM_TYPES", "SUPPORTED_TYPES", "UNSUPPORTED_HINTS", "WEIGHT_TYPES",
    "freezes", "kept", "qualname", "replace_module", "slice_linear_", "slice_param_",
    "eval_mode", "model_signature", "preserved_modes", "preserved_state",
]
