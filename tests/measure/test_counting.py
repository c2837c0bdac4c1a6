"""Tests for fairpruner._measure.counting: MAC and parameter counting, including matrix products written as
functions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
from fairpruner import zoo
from fairpruner._measure.counting import module_macs


class _Attention(nn.Module):
    """Hand-written attention: the two matmuls are functional, outside any nn.Linear."""

    def __init__(self, dim=16, tokens=5):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.tokens, self.dim = tokens, dim

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj(attn @ v)


def test_functional_matmuls_are_counted():
    m, t, d = _Attention(), 5, 16
    x = torch.randn(1, t, d)
    layers = t * d * 3 * d + t * d * d          # qkv and proj
    functional = t * t * d + t * t * d          # q @ k^T and attn @ v
    assert fp.count_macs(m, x) == layers + functional
    total, per_module = module_macs(m, x)
    assert total == layers + functional
    assert per_module == {"qkv": t * d * 3 * d, "proj": t * d * d}


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_matmuls_are_counted():
    # transformers 5 runs stacked mixture-of-experts this way: token rows grouped by expert, one weight each.
    class Grouped(nn.Module):
        def forward(self, x):
            return F.grouped_mm(x[0], torch.ones(3, 8, 12), offs=torch.tensor([3, 7, 10], dtype=torch.int32))
    total, _ = module_macs(Grouped(), torch.randn(1, 10, 8))  # one sample of 10 tokens
    assert total == 10 * 8 * 12
    assert fp.count_macs(Grouped(), torch.randn(1, 10, 8)) == total


def test_sdpa_is_counted():
    class Sdpa(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)
    q = torch.randn(1, 2, 7, 8)
    total, _ = module_macs(Sdpa(), q)
    assert total == 2 * 2 * 7 * 7 * 8
    assert fp.count_macs(Sdpa(), q) == total


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "densenet", "mlp", "conv1d_net"])
def test_layer_macs_agree_with_the_dispatcher_counter(name):
    model = zoo.create(name).eval()
    x = zoo.example_input(name, 2)
    total, per_module = module_macs(model, x)
    assert total == fp.count_macs(model, x)  # one sample, whatever the batch
    assert sum(per_module.values()) == total


def test_counting_restores_train_flag_and_params():
    model = zoo.create("digits_cnn").train()
    x = zoo.example_input("digits_cnn", 3)
    fp.count_macs(model, x)
    module_macs(model, x)
    assert model.training
    assert fp.count_params(model) == sum(p.numel() for p in model.parameters())


def test_measure_latency_positive_and_restores_mode():
    model = zoo.create("mlp").train()
    assert fp.measure_latency(model, zoo.example_input("mlp", 4), repeats=3, warmup=1) > 0
    assert model.training
    with pytest.raises(fp.FairPrunerError, match="repeats"):
        fp.measure_latency(model, zoo.example_input("mlp", 4), repeats=0)
    assert fp.measure_latency(model, zoo.example_input("mlp", 4), repeats=np.int64(2), warmup=0) > 0


@pytest.mark.parametrize("measure", [fp.count_macs, fp.measure_latency])
def test_dict_inputs_are_refused_with_the_positional_form(measure):
    """A dict would reach forward() as one argument (or fail inside a Hugging Face model): refused, naming it."""
    with pytest.raises(fp.DataError, match=r"dict \(x\).*tuple of tensors"):
        measure(zoo.create("mlp"), {"x": zoo.example_input("mlp", 2)})
