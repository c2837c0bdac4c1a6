"""Tests for the recurrent sequence classifiers of the model zoo (fairpruner.zoo._sequence)."""

from __future__ import annotations

import itertools

import pytest
import torch

import fairpruner as fp
from fairpruner import zoo
from helpers import assert_prune_equals_mask, tiny_loader


def test_registered_with_example_inputs():
    for name in ("lstm_classifier", "gru_classifier"):
        assert name in zoo.list_models()
        assert zoo.example_input(name, 3).shape == (3, 16, 12)
        assert zoo.create(name, num_classes=5).eval()(zoo.example_input(name)).shape == (2, 5)


@pytest.mark.parametrize("cell,head,bi",
                         list(itertools.product(["lstm", "gru"], ["last", "hn", "mean"], [False, True])))
def test_heads_and_directions(cell, head, bi):
    model = zoo.RecurrentClassifier(cell, input_size=4, hidden_size=6, num_layers=2, num_classes=3,
                                    bidirectional=bi, head=head).eval()
    assert model.fc.in_features == 6 * (2 if bi else 1)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("head", ["last", "hn", "mean"])
def test_time_first_layer_computes_what_the_batch_first_one_does(head):
    torch.manual_seed(0)
    a = zoo.gru_classifier(input_size=4, hidden_size=6, bidirectional=True, head=head).eval()
    b = zoo.gru_classifier(input_size=4, hidden_size=6, bidirectional=True, head=head, batch_first=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 7, 4)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="cell"):
        zoo.RecurrentClassifier("rnn")
    with pytest.raises(ValueError, match="head"):
        zoo.lstm_classifier(head="first")


@pytest.mark.parametrize("name", ["lstm_classifier", "gru_classifier"])
def test_zoo_defaults_prune_exactly(name):
    model = zoo.create(name, num_classes=3, bidirectional=True, head="hn").eval()
    scores = fp.score(model, tiny_loader(zoo.input_shape(name), classes=3, per=3, batch=9), projections=8)
    assert scores.names == ["rnn:layer0", "rnn:layer1"]
    plan = fp.plan(scores, macs=0.2)
    x = zoo.example_input(name)
    small, _ = assert_prune_equals_mask(model, plan, x)
    assert fp.count_macs(small, x) == plan.predicted["macs_after"] <= 0.8 * fp.count_macs(model, x)
    assert fp.count_params(small) == plan.predicted["params_after"]
