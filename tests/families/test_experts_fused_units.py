"""Tests for fairpruner.families.experts_fused_units: the hidden units inside transformers 5's stacked experts
(Mixtral, Qwen2-MoE) with the routers in ``ignore=``: every expert keeps one width and loses its own lowest-U
units, prune == mask, predicted == counted params/MACs, grouped-matmul alignment, generate(), a foreign expert
layout refused, and the caller's model untouched."""
from __future__ import annotations

import pytest
import torch

import fairpruner as fp
from helpers import assert_prune_equals_mask, generated_pruned_and_masked, last_token_loss, rel_err
from fairpruner.families.experts_fused import stacked_moe_blocks
from fairpruner.families.base import rank_units
from fairpruner.families.experts_fused_units import StackedExpertUnits
from .test_experts_fused import EXPERTS, fresh, loader, moe

pytest.importorskip("transformers")


def scored(kind="Mixtral", **kw):
    model = moe(kind, **kw)
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      ignore=fp.moe_routers(model), **({"loss_fn": last_token_loss(3)} if "head" in kw else {}))
    return model, scores


@pytest.mark.parametrize("kind,width", [("Mixtral", 48), ("Qwen2Moe", 24)])
def test_hidden_units_prune_equals_mask_with_one_width_per_block(kind, width):
    model, scores = scored(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hidden = [g for g in scores.groups if g.name.endswith(".experts:hidden")]
    assert len(hidden) == 2 and not any(g.name.endswith(":experts") for g in scores.groups)
    for g in hidden:  # float32: 4 ranks of every expert per unit keep the width a multiple of 16 bytes
        assert tuple(g.unit_channels.shape) == (width // 4, EXPERTS * 4)
        assert bool((g.u > 0).all()) and bool((g.r > 0).all())
        assert bool((g.u[1:] >= g.u[:-1]).all()), "units are ranks: their mean U grows"
    plan = fp.plan(scores, macs=0.3)
    assert abs(plan.achieved["macs"] - 0.3) < 0.015  # within half a unit: one unit (4 ranks x 6 experts) is ~3 %
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert rel_err(pruned(x).logits, model(x).logits) > 1e-4
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    for b in stacked_moe_blocks(pruned):
        gone = plan.removed_channels(f"{b.experts}:hidden")
        per_expert = torch.bincount(torch.tensor(gone, dtype=torch.long) // width, minlength=EXPERTS)
        left = width - int(per_expert[0])
        assert bool((per_expert == per_expert[0]).all()) and left % 4 == 0
        e = b.module.experts
        assert e.gate_up_proj.shape == (EXPERTS, 2 * left, 32) and e.down_proj.shape == (EXPERTS, 32, left)
        assert e.intermediate_dim == left
    assert any(plan.removed_channels(f"{b.experts}:hidden") for b in stacked_moe_blocks(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_l1_of_a_unit_is_its_gate_and_up_rows_in_every_expert():
    model, scores = scored("Mixtral")
    for b in stacked_moe_blocks(model):
        g = scores[f"{b.experts}:hidden"]
        w = b.module.experts.gate_up_proj.detach().abs()
        width = w.shape[1] // 2
        per_channel = (w[:, :width].sum(-1) + w[:, width:].sum(-1)).flatten().double()  # (experts * width,)
        torch.testing.assert_close(g.l1.double(), per_channel[g.unit_channels].sum(1), rtol=1e-5, atol=0)


def test_units_match_each_experts_own_ranks():
    fam = StackedExpertUnits()
    fam._layout["x:hidden"] = (3, 2)
    u = torch.tensor([[5., 1., 4., 0.], [0., 1., 2., 3.], [9., 8., 7., 6.]])  # 3 experts x 4 hidden units
    group = type("G", (), {"name": "x:hidden", "channels": 12, "n_units": 2})()
    units = fam.units_from_scores(group, u.flatten(), torch.ones(12))
    # unit 0: the two lowest-U units of every expert; unit 1: the two highest
    assert units.tolist() == [[3, 1, 4, 5, 11, 10], [2, 0, 6, 7, 9, 8]]
    assert rank_units(torch.arange(8).view(2, 4)).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_pruned_mixtral_generates_what_the_masked_one_does():
    model, scores = scored("Mixtral", head="ForCausalLM")
    plan = fp.plan(scores, macs=0.3)
    assert any(plan.removed_channels(f"{b.experts}:hidden") for b in stacked_moe_blocks(model))
    runs = generated_pruned_and_masked(model, plan, fresh(2, seed=3)[:, :4], 5)
    assert torch.equal(runs[0], runs[1])


def test_experts_that_compute_something_else_are_refused():
    model = moe("Mixtral")
    experts = stacked_moe_blocks(model)[0].module.experts
    own = experts.forward
    experts.forward = lambda *a, **k: 2 * own(*a, **k)  # not down(act(gate) * up) of its stacked weights
    with pytest.raises(fp.UnsupportedModelError, match="Prune whole experts instead"):
        fp.score(model, loader(), samples_per_class=4, projections=8, progress=False, ignore=fp.moe_routers(model))


def test_bfloat16_experts_are_scored_with_eight_ranks_per_unit():
    # The one-time layout check compares against the module's bfloat16 output with bfloat16's tolerance.
    model = moe("Mixtral").to(torch.bfloat16)
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      ignore=fp.moe_routers(model))
    hidden = [g for g in scores.groups if g.name.endswith(".experts:hidden")]
    assert len(hidden) == 2 and all(tuple(g.unit_channels.shape) == (48 // 8, EXPERTS * 8) for g in hidden)
