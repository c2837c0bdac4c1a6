"""Tests for fairpruner.families.experts_fused: transformers 5's Mixtral and Qwen2-MoE (experts stored as stacked
tensors) pruned by whole experts: groups, prune == mask, predicted == counted params/MACs, num_experts written
back, the top_k floor, generate(), and the caller's model untouched."""
from __future__ import annotations

import pytest
import torch

import fairpruner as fp
from helpers import assert_prune_equals_mask, generated_pruned_and_masked, last_token_loss, rel_err
from fairpruner.families.experts_fused import stacked_moe_blocks

transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS, EXPERTS, TOP_K, VOCAB, SEQ, CLASSES = 32, 2, 6, 2, 100, 10, 3


def moe(kind="Mixtral", head="ForSequenceClassification", seed=0):
    extra = {"num_local_experts": EXPERTS} if kind == "Mixtral" else \
        {"num_experts": EXPERTS, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 32}
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=32, num_labels=CLASSES,
        pad_token_id=0, use_cache=False, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, kind + head)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # routers with real preferences, non-trivial norms
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else
                    torch.randn(p.shape, generator=g) * (0.5 if "gate.weight" in name else 0.2))
    return model


def loader(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    return [(x[i:i + 8], torch.arange(8) % CLASSES) for i in range(0, n, 8)]


def fresh(n=3, seed=7):
    return torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["Mixtral", "Qwen2Moe"])
def test_whole_experts_prune_equals_mask(kind):
    model = moe(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False)
    blocks = stacked_moe_blocks(model)
    assert len(blocks) == LAYERS
    for b in blocks:
        g = scores[f"{b.name}:experts"]
        assert g.n_units == EXPERTS and bool((g.u > 0).all()) and bool((g.r > 0).all())
        l1 = sum(p.detach().abs().flatten(1).sum(1) for p in b.module.experts.parameters() if p.dim() > 1)
        torch.testing.assert_close(g.l1.double(), l1.double(), rtol=1e-5, atol=0)  # an expert's own weights
    plan = fp.plan(scores, params=0.25)
    gone = {g["name"]: g["removed_channels"] for g in plan.groups if g["name"].endswith(":experts")}
    assert any(gone.values()), "the plan should remove an expert"
    pruned = fp.prune(model, plan)
    x = fresh()
    assert_prune_equals_mask(model, plan, x, pruned=pruned)
    assert rel_err(pruned(x).logits, model(x).logits) > 1e-4
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, x) == plan.predicted["macs_after"]
    for b in stacked_moe_blocks(pruned):
        left = EXPERTS - len(gone[f"{b.name}:experts"])
        assert b.n == b.module.gate.num_experts == left and b.module.gate.weight.shape == (left, HIDDEN)
        assert all(p.shape[0] == left for p in b.module.experts.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_plan_must_leave_top_k_experts():
    model = moe()
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False)
    plan = fp.plan(scores, alpha=0.3)
    name = next(g["name"] for g in plan.groups if g["name"].endswith(":experts"))
    plan.removed[name] = list(range(EXPERTS - TOP_K + 1))
    for g in plan.groups:
        if g["name"] == name:
            g["removed_channels"] = list(range(EXPERTS - TOP_K + 1))
    with pytest.raises(fp.PlanError, match="at least 2 must remain"):
        fp.prune(model, plan)


def test_pruned_mixtral_generates_what_the_masked_one_does():
    model = moe("Mixtral", "ForCausalLM")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES))
    plan = fp.plan(scores, params=0.25)
    runs = generated_pruned_and_masked(model, plan, fresh(2, seed=3)[:, :4], 5)
    assert torch.equal(runs[0], runs[1])


def test_plans_leave_top_k_experts_at_any_target(tmp_path):
    """The planner keeps top_k experts in every block: any alpha or target it returns prunes, and a target
    beyond that is refused up front (it used to return plans fp.prune refused)."""
    model = moe()
    fp.score(model, loader(), samples_per_class=4, projections=8, progress=False).save(tmp_path / "s.pt")
    scores = fp.Scores.load(tmp_path / "s.pt")  # the limit travels with saved scores
    assert all(scores[f"{b.name}:experts"].max_removed == EXPERTS - TOP_K for b in stacked_moe_blocks(model))
    most = fp.plan(scores, alpha=1.0)
    for g in most.groups:
        if g["name"].endswith(":experts"):
            assert len(g["removed_channels"]) <= EXPERTS - TOP_K
    fp.prune(model, most, verify=False)
    with pytest.raises(fp.TargetError, match="most one round can remove"):
        fp.plan(scores, params=most.achieved["params"] + 0.05)
    uniform = fp.plan(scores, params=most.achieved["params"] - 0.01, allocation="uniform")
    fp.prune(model, uniform, verify=False)


@pytest.mark.parametrize("kind", ["Mixtral", "Qwen2Moe"])
def test_equal_expert_counts_are_written_back_so_the_router_loss_runs(kind):
    model = moe(kind, "ForCausalLM")
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES))
    plan = fp.plan(scores, alpha=0.0)
    for g in plan.groups:  # one expert out of every block
        if g["name"].endswith(":experts"):
            g["removed_channels"] = plan.removed[g["name"]] = [1]
    pruned = fp.prune(model, plan)
    key = "num_local_experts" if kind == "Mixtral" else "num_experts"
    assert getattr(pruned.config, key) == pruned.num_experts == EXPERTS - 1
    assert getattr(model.config, key) == model.num_experts == EXPERTS  # the caller's model keeps its own
    x = fresh()
    out = pruned.train()(x, labels=x, output_router_logits=True)
    assert torch.isfinite(out.aux_loss)


def test_unequal_expert_counts_turn_the_router_loss_off_with_a_warning():
    """transformers computes the router loss in every forward when the config asks for it, and fails on blocks of
    different sizes: the pruned model's config stops asking (the caller's keeps it)."""
    model = moe("Mixtral", "ForCausalLM")
    model.config.output_router_logits = True
    scores = fp.score(model, loader(), samples_per_class=4, projections=8, progress=False,
                      loss_fn=last_token_loss(CLASSES))
    plan = fp.plan(scores, alpha=0.0)
    names = [g["name"] for g in plan.groups if g["name"].endswith(":experts")]
    for g in plan.groups:
        if g["name"] in names:
            g["removed_channels"] = plan.removed[g["name"]] = [1] if g["name"] == names[0] else []
    with pytest.warns(UserWarning, match=r"different numbers of experts \(\[5, 6\]\).*output_router_logits is now"):
        pruned = fp.prune(model, plan)
    assert pruned.config.num_local_experts == EXPERTS
    assert not pruned.config.output_router_logits and model.config.output_router_logits
    assert torch.isfinite(pruned(fresh()).logits).all()
