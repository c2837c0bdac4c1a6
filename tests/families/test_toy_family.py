"""A unit family written in a test, with nothing but the public contract of fairpruner.families: it proves a
new kind of unit needs no change to the core. Also the registry's rules and versioned family options."""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

import fairpruner as fp
from fairpruner import families
from fairpruner.families import Family, FamilyOptions, GroupSpec, Member, hook_source
from helpers import assert_prune_equals_mask


class Gate(nn.Module):
    """A custom block torch-pruning does not know: ``x * sigmoid(gate)`` with a Linear before it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(8, width)
        self.gate = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return torch.relu(self.fc(x)) * torch.sigmoid(self.gate)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Gate(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(x))


@dataclasses.dataclass(frozen=True)
class GateOptions(FamilyOptions):
    version: ClassVar[int] = 2
    min_keep: int = 1

    def __post_init__(self) -> None:
        if self.min_keep < 1:
            raise fp.FairPrunerError("min_keep must be >= 1")


class GateUnits(Family):
    """Unit = one output of a Gate: its fc row and bias, its gate entry and the next layer's column."""

    name = "toy_gate_units"
    Options = GateOptions

    def claims(self, module):  # its own parameter (gate) is cut by this family, not refused
        return isinstance(module, Gate)

    def owned(self, model):
        return [n for n, m in model.named_modules() if isinstance(m, Gate)] + \
            [f"{n}.fc" for n, m in model.named_modules() if isinstance(m, Gate)]

    def discover(self, model, graph, example_inputs, ignore):
        groups = []
        for name, m in model.named_modules():
            if isinstance(m, Gate) and name not in ignore:
                n = m.fc.out_features
                rows = torch.arange(n).view(n, 1)
                members = [Member(f"{name}.fc", "out", rows, "weight"),
                           Member(name, "out", rows, "other", params=(("gate", 0),)),
                           Member("head", "in", rows, "weight")]
                groups.append(GroupSpec(f"{name}:units", n, rows.clone(), members, family=self))
        return groups

    def u_sources(self, model, group):
        return [hook_source(group.name, group.name.split(":")[0])]

    def prune_(self, model, group, channels):
        block = model.get_submodule(group.name.split(":")[0])
        keep = families.kept(block.fc.out_features, torch.tensor(channels))
        families.slice_linear_(block.fc, 0, keep)
        block.gate = nn.Parameter(block.gate.detach()[keep].clone())
        families.slice_linear_(model.head, 1, keep)


@pytest.fixture
def registered():
    families.register(GateUnits)
    yield GateUnits
    families.unregister(GateUnits.name)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 8, generator=g)
    return x, [(x[i:i + 8], torch.arange(8) % 3) for i in range(0, 24, 8)]


def test_toy_family_scores_plans_prunes_and_masks_through_the_core(registered):
    torch.manual_seed(0)
    model = Net().eval()
    x, batches = _data()
    scores = fp.score(model, batches, projections=4, family_options={"toy_gate_units": GateOptions(min_keep=2)})
    assert "block:units" in scores.names
    assert scores.meta["family_options"]["toy_gate_units"] == {"version": 2, "min_keep": 2}
    plan = fp.plan(scores, alpha=1.0)
    assert plan.removed["block:units"]
    pruned, _ = assert_prune_equals_mask(model, plan, x[:4])
    assert pruned.block.fc.out_features == 6 - len(plan.removed["block:units"]) == pruned.block.gate.numel()
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x[:1]) == plan.predicted["macs_after"]


def test_without_the_family_the_custom_parameter_is_refused():
    with pytest.raises(fp.UnsupportedModelError, match="gate"):
        fp.score(Net().eval(), _data()[1], projections=4)


def test_registry_is_loud_on_duplicates_and_non_families(registered):
    families.register(GateUnits)  # the same class again is harmless
    clone = type("GateUnits2", (GateUnits,), {"name": "toy_gate_units"})
    with pytest.raises(fp.FairPrunerError, match="already registered"):
        families.register(clone)
    for builtin in families.registered():  # a built-in name is held just the same
        impostor = type("Impostor", (GateUnits,), {"name": builtin.name})
        with pytest.raises(fp.FairPrunerError, match="already registered"):
            families.register(impostor)
    assert families.registered()[-1] is GateUnits  # the refused classes left the registry as it was
    with pytest.raises(fp.FairPrunerError, match="Family subclass"):
        families.register(object)
    nameless = type("Nameless", (GateUnits,), {"name": ""})
    with pytest.raises(fp.FairPrunerError, match="no `name`"):
        families.register(nameless)
    with pytest.raises(fp.FairPrunerError, match="unknown unit families"):
        families.build({"no_such_family": {}})
    with pytest.raises(TypeError):
        type("Incomplete", (Family,), {"name": "x"})()  # abstract methods missing


def test_options_round_trip_and_newer_versions_refused(registered):
    opt = GateOptions(min_keep=3)
    assert GateOptions.from_dict(opt.to_dict()) == opt
    with pytest.raises(fp.FairPrunerError, match="newer"):
        GateOptions.from_dict({"version": 9, "min_keep": 3})
    with pytest.raises(fp.FairPrunerError, match="min_keep"):
        GateOptions(min_keep=0)
    built = {f.name: f for f in families.build({"toy_gate_units": opt.to_dict()})}
    assert built["toy_gate_units"].options == opt
    with pytest.raises(fp.FairPrunerError, match="takes GateOptions"):
        GateUnits(families.AttentionOptions())


def test_legacy_plan_options_still_apply():
    """Plans written before options were per family recorded ``{"attention": "head_dims"}``."""
    built = {f.name: f for f in families.build({"attention": "head_dims"})}
    # Written before query heads existed: grouped-query attention went by key/value groups.
    assert built["attention_heads"].options == families.AttentionOptions(units="head_dims", gqa="kv_groups")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(16 * 6, 3)).eval()
    x = torch.randn(24, 6, 16)
    scores = fp.score(model, [(x[i:i + 8], torch.arange(8) % 3) for i in range(0, 24, 8)], projections=4,
                      attention="head_dims")
    plan = fp.plan(scores, alpha=0.3)
    record = json.loads(plan.to_json())
    assert record["settings"]["scoring"]["family_options"]["attention_heads"]["units"] == "head_dims"
    record["settings"]["scoring"]["family_options"] = {"attention": "head_dims"}  # as older files hold it
    legacy = fp.Plan.from_json(json.dumps(record))
    new, old = fp.prune(model, plan), fp.prune(model, legacy)
    assert [p.shape for p in new.parameters()] == [p.shape for p in old.parameters()]
    assert [p.shape for p in new.parameters()] != [p.shape for p in model.parameters()]
    with torch.no_grad():
        assert torch.equal(new(x[:4]), old(x[:4]))
