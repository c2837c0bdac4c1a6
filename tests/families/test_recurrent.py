"""Tests for fairpruner.families.recurrent: hidden units of LSTM/GRU/RNN layers as a unit family (scores, plans, exact
surgery, predicted costs, save/load, the RecurrentStack replacement), the layers that read the units, and the
errors for what stays unsupported."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

import fairpruner as fp
from fairpruner import RecurrentStack
from fairpruner._planning.plans import Plan
from fairpruner.families.recurrent.family import _TPPruner
from fairpruner._scoring.sites import site_seed
from fairpruner._scoring.wasserstein import random_directions
from helpers import CountingLoader, Scored, assert_prune_equals_mask, fresh_inputs, rel_err, tiny_loader

T, FEATS, PROJ, H = 5, 6, 8, 10
SHAPE = (T, FEATS)
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class Net(nn.Module):
    """Linear + ReLU -> LSTM/GRU -> head -> Linear. The model's input is batch-first; a time-first layer gets
    it transposed. head: "last" (output at the last step) or "hn" (the last layer's h_n, both directions)."""

    def __init__(self, cell: str, layers: int, bi: bool, batch_first: bool, head: str) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATS, PROJ)
        self.rnn = CELLS[cell](PROJ, H, num_layers=layers, bidirectional=bi, batch_first=batch_first)
        self.fc = nn.Linear(H * (2 if bi else 1), 4)
        self.bi, self.batch_first, self.head, self.lstm = bi, batch_first, head, cell == "lstm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj(x))
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if self.head == "last":
            return self.fc(out[:, -1] if self.batch_first else out[-1])
        h = state[0] if self.lstm else state
        return self.fc(torch.cat([h[-2], h[-1]], 1) if self.bi else h[-1])


# cell x layers x directions x layout; the head alternates with the layout so every cell/layers/directions
# combination is read both ways.
CASES = [(c, n, bi, bf) for c, n, bi, bf in itertools.product(CELLS, (1, 2), (False, True), (True, False))]
IDS = [f"{c}-{n}l-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}" for c, n, bi, bf in CASES]
TARGETS = {"alpha": {"alpha": 0.3}, "macs": {"macs": 0.3}}


def make(case, seed=0) -> Net:
    c, n, bi, bf = case
    torch.manual_seed(seed)
    return Net(c, n, bi, bf, "last" if bf else "hn").eval()


scored = Scored(lambda case: (make(case), tiny_loader(SHAPE), {}), TARGETS)
pruned = scored.case


def assert_exact(model, plan) -> None:
    """The pruned model meets the predicted params/MACs and computes what the masked model does."""
    x = fresh_inputs(SHAPE)
    small, _ = assert_prune_equals_mask(model, plan, x)
    assert fp.count_params(small) == plan.predicted["params_after"]
    assert fp.count_macs(small, x) == plan.predicted["macs_after"]


def hidden_sizes(module) -> list:
    if isinstance(module, RecurrentStack):
        return list(module.hidden_sizes)
    return [module.hidden_size] * module.num_layers


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_groups_and_scores(case):
    model, _, scores = scored(case)
    layers = case[1]
    assert scores.names == ["proj"] + [f"rnn:layer{k}" for k in range(layers)]
    for k in range(layers):
        g = scores[f"rnn:layer{k}"]
        assert g.n_units == g.channels == H
        for v in (g.u, g.r, g.l1):
            assert bool(torch.isfinite(v).all()) and bool((v >= 0).all())
        assert float(g.u.min()) > 0 and float(g.l1.min()) > 0  # every unit's sequence separates some classes


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prune_shrinks_equals_mask_and_meets_predictions(case, target):
    model, scores, plan, small = pruned(case, target=target)
    removed = [len(plan.removed[f"rnn:layer{k}"]) for k in range(case[1])]
    assert sum(removed) > 0
    assert hidden_sizes(small.rnn) == [H - r for r in removed]
    assert small.fc.in_features == (H - removed[-1]) * (2 if case[2] else 1)
    assert small.rnn.input_size == PROJ - len(plan.removed["proj"])
    x = fresh_inputs(SHAPE)
    assert fp.count_params(small) < fp.count_params(model)
    assert fp.count_macs(small, x) < fp.count_macs(model, x)
    assert fp.count_params(small) == plan.predicted["params_after"]
    assert fp.count_macs(small, x) == plan.predicted["macs_after"]
    assert fp.count_macs(model, x) == plan.predicted["macs_before"]
    assert not small.training and all(not m.training for m in small.modules())
    _, masked = assert_prune_equals_mask(model, plan, x, pruned=small)
    with torch.no_grad():  # masking really removes something: the masked model differs from the original
        assert rel_err(masked(x), model(x)) > 1e-4


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip_and_callers_model_unchanged(case, tmp_path):
    model, _, plan, small = pruned(case, target="alpha")
    reference = make(case)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert type(model.rnn) is CELLS[case[0]] and model.rnn.hidden_size == H
    path = tmp_path / "pruned.pt"
    fp.save(path, small, plan)
    loaded = fp.load(path, make(case, seed=5))
    x = fresh_inputs(SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert type(loaded.rnn) is type(small.rnn)


# ---------------------------------------------------------------- layers that keep different counts

def _plan_removing(scores, removals) -> Plan:
    """A plan that removes the given units of each named group (the others keep everything)."""
    plan = fp.plan(scores, alpha=0.0)
    for g in plan.groups:
        units = removals.get(g["name"], [])
        plan.removed[g["name"]] = list(units)
        g["removed_channels"] = list(units)
    counts = [len(removals.get(g.name, [])) for g in scores.groups]
    after = scores.cost.evaluate(counts)
    plan.predicted.update(params_after=after["params"], macs_after=after["macs"])
    return plan


def test_unequal_layers_become_a_stack_and_prune_again(tmp_path):
    model = Net("lstm", 2, True, False, "hn").eval()
    scores = fp.score(model, tiny_loader(SHAPE), projections=8)
    plan = _plan_removing(scores, {"rnn:layer0": [0, 3, 7], "rnn:layer1": [5]})
    small = fp.prune(model, plan)
    assert isinstance(small.rnn, RecurrentStack) and small.rnn.hidden_sizes == (7, 9)
    x = fresh_inputs(SHAPE)
    out, (h, c) = small.rnn(torch.relu(small.proj(x)).transpose(0, 1))
    assert out.shape == (T, 3, 18) and isinstance(h, tuple) and [t.shape for t in h] == [(3, 7)] * 2 + [(3, 9)] * 2
    assert fp.count_params(small) == plan.predicted["params_after"]
    assert fp.count_macs(small, x) == plan.predicted["macs_after"]
    assert_prune_equals_mask(model, plan, x, pruned=small)
    # Second round on the stack: its layers are single-layer modules, each a group.
    scores2 = fp.score(small, tiny_loader(SHAPE), projections=8)
    assert {"rnn.layers.0:layer0", "rnn.layers.1:layer0"} <= set(scores2.names)
    plan2 = _plan_removing(scores2, {"rnn.layers.0:layer0": [1], "rnn.layers.1:layer0": [0, 2]})
    smaller = fp.prune(small, plan2)
    assert smaller.rnn.hidden_sizes == (6, 7)
    assert fp.count_params(smaller) == plan2.predicted["params_after"]
    assert fp.count_macs(smaller, x) == plan2.predicted["macs_after"]
    path = tmp_path / "two_rounds.pt"
    fp.save(path, smaller, plan2)
    loaded = fp.load(path, Net("lstm", 2, True, False, "hn").eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), smaller(x))
    # Equal counts again: one multi-layer module, as before pruning.
    plan3 = _plan_removing(scores, {"rnn:layer0": [1, 2], "rnn:layer1": [3, 4]})
    even = fp.prune(model, plan3)
    assert type(even.rnn) is nn.LSTM and even.rnn.hidden_size == 8 and even.rnn.num_layers == 2


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stack_computes_what_the_layer_does(cell):
    torch.manual_seed(0)
    rnn = CELLS[cell](FEATS, H, num_layers=3, bidirectional=True, dropout=0.5).eval()
    from fairpruner.families.recurrent.layers import split_layers
    stack = RecurrentStack(split_layers(copy.deepcopy(rnn)), dropout=0.5).eval()
    x = torch.randn(T, 2, FEATS)
    h0 = torch.randn(6, 2, H)
    hx = (h0, torch.randn(6, 2, H)) if cell == "lstm" else h0
    split = (tuple(hx[0]), tuple(hx[1])) if cell == "lstm" else tuple(hx)
    with torch.no_grad():
        a_out, a_state = rnn(x, hx)
        b_out, b_state = stack(x, split)
    torch.testing.assert_close(b_out, a_out)
    for a, b in zip(a_state if cell == "lstm" else (a_state,), b_state if cell == "lstm" else (b_state,)):
        torch.testing.assert_close(torch.stack(b), a)
    assert stack.input_size == FEATS and stack.hidden_size == H and stack.num_layers == 3
    stack.train()
    torch.manual_seed(1)
    assert not torch.equal(stack(x)[0], b_out)  # dropout between layers in training mode


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_time_first_layer_scores_like_batch_first(cell):
    a = make((cell, 2, True, True))
    b = make((cell, 2, True, False))
    a.head = "hn"
    b.load_state_dict(a.state_dict())
    sa, sb = (fp.score(m, tiny_loader(SHAPE), projections=8) for m in (a, b))
    for g in sa.names:
        torch.testing.assert_close(sb[g].u, sa[g].u)
        torch.testing.assert_close(sb[g].r, sa[g].r, rtol=1e-4, atol=1e-7)


def test_predictions_exact_for_a_layer_without_groups():
    """An ignored recurrent layer still loses input columns to its producer's group; its MACs follow."""
    model = make(("lstm", 2, True, True))
    scores = fp.score(model, tiny_loader(SHAPE), projections=8, ignore=["rnn"])
    assert scores.names == ["proj"]
    plan = fp.plan(scores, alpha=0.5)
    small = fp.prune(model, plan)
    assert small.rnn.input_size == PROJ - len(plan.removed["proj"]) < PROJ
    x = fresh_inputs(SHAPE)
    assert fp.count_macs(small, x) == plan.predicted["macs_after"] < fp.count_macs(model, x)
    assert fp.count_params(small) == plan.predicted["params_after"]


def test_u_is_the_sliced_w1_of_each_units_output_sequence():
    """Layer 0 of a 2-layer bidirectional GRU (its output sequence is recomputed inside the hook): per unit the
    (T * 2)-vector over time steps and directions, sliced W1 over seeded directions, max over class pairs."""
    model = Net("gru", 2, True, True, "last").eval()
    loader = tiny_loader(SHAPE, per=3)
    scores = fp.score(model, loader, projections=8)
    one = nn.GRU(PROJ, H, batch_first=True, bidirectional=True)
    one.load_state_dict({k: v for k, v in model.rnn.state_dict().items() if "_l0" in k})
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        seq = one(torch.relu(model.proj(x)))[0]
    units = seq.view(len(y), T, 2, H).permute(0, 3, 1, 2).flatten(2).double()
    gen = torch.Generator().manual_seed(site_seed(0, "rnn:layer0", "family"))
    projected = (units @ random_directions(2 * T, 8, gen).double()).numpy()
    naive = torch.tensor([max(
        sum(wasserstein_distance(projected[y == a, j, p], projected[y == b, j, p]) for p in range(8)) / 8
        for a, b in itertools.combinations(range(4), 2)) for j in range(H)])
    torch.testing.assert_close(scores["rnn:layer0"].u.double(), naive, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- what reads the units

class Readers(nn.Module):
    """One recurrent module and a head that reads its units in a given way."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "rnn_tanh":
            self.rnn = nn.RNN(FEATS, H, 2, batch_first=True)
        elif how == "rnn_relu_bi":
            self.rnn = nn.RNN(FEATS, H, 2, batch_first=True, nonlinearity="relu", bidirectional=True)
        elif how in ("hn_all_layers", "cn_too"):
            self.rnn = nn.LSTM(FEATS, H, 2, batch_first=True)
        else:
            self.rnn = nn.GRU(FEATS, H, 2, batch_first=True, bidirectional=True)
        width = {"flatten_time": T * 2 * H, "hn_all_layers": 2 * H, "cn_too": 2 * H, "rnn_tanh": H,
                 "rnn_relu_bi": 2 * H, "conv": 8, "rnn_then_rnn": 8, "mean_sigmoid_in": 2 * H,
                 "two_modules": 3 * H}[how]
        if how == "conv":
            self.conv = nn.Conv1d(2 * H, 8, 3)
        if how == "rnn_then_rnn":
            self.rnn2 = nn.LSTM(2 * H, 8, batch_first=True)
        if how == "mean_sigmoid_in":
            self.proj = nn.Linear(FEATS, FEATS)
        if how == "two_modules":
            self.rnn2 = nn.LSTM(FEATS, H, batch_first=True)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        if self.how == "mean_sigmoid_in":  # sigmoid(0) != 0: masking must zero the layer's input columns too
            x = torch.sigmoid(self.proj(x))
        out, state = self.rnn(x)
        if self.how == "flatten_time":  # time-major flattening: unit h sits at t * 2H + h and t * 2H + H + h
            return self.fc(out.flatten(1))
        if self.how == "hn_all_layers":  # h_n of both layers: one reader, two groups cut its columns
            return self.fc(torch.cat(list(state[0]), 1))
        if self.how == "cn_too":
            return self.fc(torch.cat([state[0][-1], state[1][-1]], 1))
        if self.how == "conv":
            return self.fc(self.conv(out.transpose(1, 2)).amax(-1))
        if self.how == "rnn_then_rnn":
            return self.fc(self.rnn2(out)[1][0][-1])
        if self.how == "two_modules":  # one reader of two recurrent modules: the second cut sees shifted columns
            return self.fc(torch.cat([out[:, -1], self.rnn2(x)[0][:, -1]], 1))
        return self.fc(out.mean(1) if self.how == "mean_sigmoid_in" else out[:, -1])


READERS = ["flatten_time", "hn_all_layers", "cn_too", "conv", "rnn_then_rnn", "rnn_tanh", "rnn_relu_bi",
           "mean_sigmoid_in", "two_modules"]


@pytest.mark.parametrize("how", READERS)
def test_readers_are_cut_exactly(how):
    torch.manual_seed(1)
    model = Readers(how).eval()
    scores = fp.score(model, tiny_loader(SHAPE), projections=8)
    assert {"rnn:layer0", "rnn:layer1"} <= set(scores.names)
    # Both layers lose units (so a reader of both is cut twice), and so does every other group.
    plan = _plan_removing(scores, {g.name: [1, 4] if g.name == "rnn:layer1" else [0, 2, 3] for g in scores.groups})
    assert_exact(model, plan)


class Kept(nn.Module):
    """Units that cannot go one by one: the group of the layer that feeds them is not offered."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.p = nn.Linear(FEATS, H)
        self.rnn = nn.GRU(H, H, 2, batch_first=True)
        self.ln = nn.LayerNorm(H)
        self.fc = nn.Linear(2 * H if how == "concatenated" else H, 4)

    def forward(self, x):
        out = self.rnn(self.p(x))[0]
        if self.how == "layernorm":
            return self.fc(self.ln(out[:, -1]))
        if self.how == "residual":  # coupled to the producer p's channels
            return self.fc((out + self.p(x))[:, -1])
        if self.how == "concatenated":  # fc's columns are also cut by p's group
            return self.fc(torch.cat([self.p(x[:, 0]), out[:, -1]], 1))
        return out[:, -1, :4]  # the output itself


@pytest.mark.parametrize("how", ["layernorm", "residual", "concatenated", "output"])
def test_units_that_cannot_go_alone_are_kept(how):
    model = Kept(how).eval()
    scores = fp.score(model, tiny_loader(SHAPE), projections=8)
    assert "rnn:layer0" in scores.names and "rnn:layer1" not in scores.names
    plan = fp.plan(scores, alpha=0.5)
    assert_exact(model, plan)


# ---------------------------------------------------------------- errors

class Bad(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.h0 = nn.Linear(FEATS, H)
        kind = {"proj_size": lambda: nn.LSTM(FEATS, H, batch_first=True, proj_size=4),
                "subclass": lambda: type("MyGRU", (nn.GRU,), {})(FEATS, H, batch_first=True)}
        self.rnn = kind.get(how, lambda: nn.GRU(FEATS, H, batch_first=True))()
        self.fc = nn.Linear(4 if how == "proj_size" else H if how != "hidden_sum" else T, 4)

    def forward(self, x):
        if self.how == "initial_state":
            return self.fc(self.rnn(x, self.h0(x[:, 0]).unsqueeze(0))[0][:, -1])
        if self.how == "packed":
            lengths = torch.full((x.shape[0],), T)
            return self.fc(self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True))[1][-1])
        if self.how == "twice":
            return self.fc(self.rnn(self.rnn(x)[0][..., :FEATS])[0][:, -1])
        if self.how == "hidden_sum":
            return self.fc(self.rnn(x)[0].sum(-1))
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("how,match", [
    ("proj_size", "proj_size"), ("subclass", "subclasses"), ("initial_state", "initial state"),
    ("packed", "PackedSequence"), ("twice", "more than once"), ("hidden_sum", "mixed"),
])
def test_unsupported_refused_before_scoring(how, match):
    model = Bad(how).eval()
    loader = CountingLoader(tiny_loader(SHAPE))
    with pytest.raises(fp.UnsupportedModelError, match=match):
        fp.score(model, loader, projections=8)
    assert loader.drawn <= 1


def test_torch_pruning_never_cuts_hidden_units():
    with pytest.raises(fp.FairPrunerError, match="recurrent family"):
        _TPPruner().prune_out_channels(nn.GRU(4, 4), [0])
