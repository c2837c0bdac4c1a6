"""One contract for every registered unit family (fairpruner.families): on each family's example models,
pruned == masked, predicted params/MACs == counted, the family's groups lose units, the caller's model is
untouched. A registered family without an example case fails here."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fairpruner as fp
from fairpruner import families, zoo
from fairpruner._graph import build_graph
from helpers import assert_prune_equals_mask


def _labels(n, classes):
    return torch.arange(n) % classes


def _rnn(kind):
    torch.manual_seed(0)
    model = zoo.create(kind).eval()
    x = torch.randn(24, 16, 12)
    return model, x, {}


def _moe(mode):
    torch.manual_seed(0)
    model = zoo.moe_classifier().eval()
    x = zoo.example_input("moe_classifier", 24)
    return model, x, ({"ignore": fp.moe_routers(model)} if mode == "hidden" else {})


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(16 * 6, 3)).eval()
    return model, torch.randn(24, 6, 16), {}


def _vit():
    torch.manual_seed(0)
    model = zoo.vit_tiny_cifar(num_classes=3).eval()
    return model, torch.randn(24, 3, 32, 32), {}


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    return model, torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(0)), {}


CASES = {
    "recurrent": [("lstm", lambda: _rnn("lstm_classifier")), ("gru", lambda: _rnn("gru_classifier"))],
    "experts": [("whole experts", lambda: _moe("experts")), ("expert hidden units", lambda: _moe("hidden"))],
    "attention_heads": [("nn.TransformerEncoder", _encoder), ("vit_tiny_cifar", _vit)],
    "hf_attention_heads": [("BERT", _bert)],
}


def test_every_registered_family_has_a_case():
    assert {c.name for c in families.registered()} <= set(CASES)


@pytest.mark.parametrize("family,case,build", [(f, c, b) for f, cs in CASES.items() for c, b in cs],
                         ids=[f"{f}-{c}" for f, cs in CASES.items() for c, _ in cs])
def test_family_contract(family, case, build):
    model, x, kwargs = build()
    state = copy.deepcopy(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = [(x[i:i + 8], _labels(8, 3)) for i in range(0, len(x), 8)]
    scores = fp.score(model, batches, projections=8, **kwargs)
    owned = [g for g in scores.groups if any(g.name.startswith(n) for n in _family_group_names(model, x, family,
                                                                                                kwargs))]
    assert owned, f"no {family} groups found in {case}"
    # Whole experts save parameters, not per-token MACs: they are planned by alpha.
    plan = fp.plan(scores, alpha=0.05) if family == "experts" and "ignore" not in kwargs else fp.plan(scores, macs=0.3)
    assert any(plan.removed[g.name] for g in owned), f"the {family} groups lost nothing"
    pruned, _ = assert_prune_equals_mask(model, plan, x[:4])
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    macs = fp.count_macs(pruned, x[:1])
    assert abs(macs - plan.predicted["macs_after"]) <= 0.01 * plan.predicted["macs_after"]  # routing may move
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _family_group_names(model, x, family, kwargs):
    fam = next(f for f in families.build() if f.name == family)
    graph = build_graph(model, (x[:2],), families.build())
    return [g.name for g in fam.discover(model, graph, (x[:2],), tuple(kwargs.get("ignore", ())))]
