"""Tests for fairpruner._core.inputs: the device a call may run on, the dtype inputs follow, dict inputs refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fairpruner._core.inputs import (as_args, check_device, describe_inputs, float_dtype, model_device,
                                     synthetic_inputs, to_device)
from fairpruner._errors import DataError, FairPrunerError


def test_check_device_names_what_is_wrong():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(FairPrunerError, match="Unknown device 'gpu0'"):
        check_device("gpu0")
    if torch.cuda.device_count() < 8:
        with pytest.raises(FairPrunerError, match="'cuda:7' asked for"):
            check_device("cuda:7")


def test_float_dtype_is_the_model_s_one_float_dtype_or_none():
    assert float_dtype(nn.Linear(2, 2).bfloat16()) == torch.bfloat16
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).bfloat16())
    assert float_dtype(mixed) is None and float_dtype(nn.ReLU()) is None


def test_to_device_casts_floating_tensors_only():
    x, ids = torch.randn(2, 3), torch.arange(3)
    a, b = to_device((x, ids), torch.device("cpu"), torch.bfloat16)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.int64
    assert to_device(x, torch.device("cpu"), None).dtype == torch.float32


def test_model_device_accepts_any_device_the_model_holds_tensors_on():
    model = nn.Linear(2, 2)
    assert model_device(model, None) == torch.device("cpu") == model_device(model, "cpu")
    with pytest.raises(FairPrunerError, match="move it there first"):
        model_device(model, "meta")
    model.register_buffer("offloaded", torch.zeros(1, device="meta"))
    assert model_device(model, "meta") == torch.device("meta")


def test_dict_inputs_are_refused():
    with pytest.raises(DataError, match="tuple of tensors"):
        as_args({"input_ids": torch.zeros(1, 3)})


def test_recorded_inputs_keep_plain_values_in_their_places():
    specs = describe_inputs((torch.zeros(5, 3, dtype=torch.long), None, torch.ones(5, 2), True, object()))
    assert specs == [{"shape": [5, 3], "dtype": "int64"}, {"value": None}, {"shape": [5, 2], "dtype": "float32"},
                     {"value": True}]
    rebuilt = synthetic_inputs(specs)
    assert rebuilt[1] is None and rebuilt[3] is True
    assert rebuilt[0].shape == (2, 3) and rebuilt[0].dtype == torch.long and rebuilt[2].shape == (2, 2)
