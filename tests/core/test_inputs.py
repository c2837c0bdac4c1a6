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
    assert specs == [{"shape": [5, 3], "dtype": "int64", "low": 0, "high": 0}, {"value": None},
                     {"shape": [5, 2], "dtype": "float32"}, {"value": True}]
    rebuilt = synthetic_inputs(specs)
    assert rebuilt[1] is None and rebuilt[3] is True
    assert rebuilt[0].shape == (2, 3) and rebuilt[0].dtype == torch.long and rebuilt[2].shape == (2, 2)


def test_synthetic_integers_stay_in_the_recorded_range():
    ids = torch.randint(5, 51, (4, 16))
    ids[0, 0], ids[0, 1] = 5, 50
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    specs = describe_inputs((ids, mask, torch.ones(4, 16, dtype=torch.bool)))
    assert (specs[0]["low"], specs[0]["high"], specs[1]["low"], specs[1]["high"]) == (5, 50, 0, 1)
    got_ids, got_mask, got_bool = synthetic_inputs(specs, batch=8)
    # A fully visible mask, not the all-zero one that masks every position of the pruned-vs-masked check.
    assert got_mask.dtype == torch.long and bool((got_mask == 1).all())
    assert got_bool.dtype == torch.bool and bool(got_bool.all())
    assert got_ids.shape == (8, 16) and 5 <= int(got_ids.min()) and int(got_ids.max()) <= 50
    assert len(set(got_ids.flatten().tolist())) > 10  # random ids, not one repeated token
    assert bool((synthetic_inputs(specs, batch=8)[0] == got_ids).all())  # seeded


def test_inputs_recorded_without_a_range_are_zeros():
    specs = [{"shape": [3, 4], "dtype": "int64"}]  # plans written before ranges were recorded
    assert bool((synthetic_inputs(specs)[0] == 0).all())
