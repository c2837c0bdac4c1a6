"""Tests for fairpruner.families.experts: mixture-of-experts blocks, whole experts or hidden units inside experts as
units; U sources against hand-computed oracles, R against a hand-computed Taylor sum, surgery (pruned == masked,
exact cost predictions, top-k constraint), save/load, and a Mixtral-style block (gate, SwiGLU, slot order)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
from fairpruner import zoo
from fairpruner.families.experts import Experts, moe_blocks
from fairpruner._graph import build_graph
from helpers import Scored, assert_prune_equals_mask, fresh_inputs, rel_err, tiny_loader

SHAPE = (6, 12)  # (tokens, features)


def make(depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    return zoo.moe_classifier(in_features=SHAPE[1], dim=16, hidden=24, depth=depth, num_classes=4, **kw).eval()


def loader(shape=SHAPE):
    return tiny_loader(shape, classes=4, per=6)


def _setup(mode, depth):
    model, data = make(depth), loader()
    ignore = fp.moe_routers(model) if mode == "hidden" else []
    return model, data, {"example_inputs": data[0][0], "ignore": ignore}


scored = Scored(_setup)


def removing(plan, name, channels):
    """The plan with group ``name`` losing exactly ``channels`` (what prune/mask read)."""
    for g in plan.groups:
        if g["name"] == name:
            g["removed_channels"] = list(channels)
    plan.removed[name] = list(channels)
    return plan


def discovered(model, x, ignore=()):
    return Experts().discover(model, build_graph(model, x, fp.families.build()), (x,), tuple(ignore))


# ---------------------------------------------------------------- discovery and options

def test_blocks_routers_and_groups_by_option():
    model = make()
    x = loader()[0][0]
    assert [b.name for b in moe_blocks(model)] == ["blocks.0.moe", "blocks.1.moe"]
    assert fp.moe_routers(model) == ["blocks.0.moe.router", "blocks.1.moe.router"]
    groups = discovered(model, x)
    assert [g.name for g in groups] == ["blocks.0.moe:experts", "blocks.1.moe:experts"]
    g = groups[0]
    assert g.n_units == 4 and g.family.name == "experts"
    owners = sorted({m.owner for m in g.members if m.owner is not None})
    assert owners == [0, 1, 2, 3] and g.members[0].module == "blocks.0.moe.router"
    # The router of block 1 ignored: its experts stay, their hidden units become the units.
    names = [g.name for g in discovered(model, x, ["blocks.1.moe.router"])]
    assert names == ["blocks.0.moe:experts"] + [f"blocks.1.moe.experts.{e}.fc1:hidden" for e in range(4)]
    hidden = discovered(model, x, ["blocks.1.moe.router"])[1]
    assert [(m.module, m.side) for m in hidden.members] == [
        ("blocks.1.moe.experts.0.fc1", "out"), ("blocks.1.moe.experts.0.fc2", "in")]
    # A block, its expert list, or one expert protected.
    assert [g.name for g in discovered(model, x, ["blocks.0.moe", "blocks.1.moe.experts"])] == []
    names = [g.name for g in discovered(model, x, fp.moe_routers(model) + ["blocks.0.moe.experts.2"])]
    assert "blocks.0.moe.experts.2.fc1:hidden" not in names and len(names) == 7
    # torch-pruning never roots groups inside the blocks.
    scores = scored("experts", 2)[2]
    assert scores.names == ["head.0", "blocks.0.moe:experts", "blocks.1.moe:experts"]


def test_no_expert_group_when_all_experts_are_needed():
    model = make(depth=1)
    model.blocks[0].moe.top_k = 4
    assert discovered(model, loader()[0][0]) == []


# ---------------------------------------------------------------- U sources and R against oracles

def _oracle(block, h):
    """Dense reference: every expert on every token, masked by the routing (batch-first h: (B, T, D))."""
    b, t, d = h.shape
    tokens = h.reshape(-1, d)
    top, chosen = block.router(tokens).topk(block.top_k, -1)
    gates = top.softmax(-1)
    e_all = torch.arange(len(block.experts))
    weight = ((chosen.unsqueeze(-1) == e_all) * gates.unsqueeze(-1)).sum(1)  # (N, E)
    contrib = torch.stack([ex(tokens) for ex in block.experts], 1) * weight.unsqueeze(-1)  # (N, E, D)
    hidden = [ex.act(ex.fc1(tokens)) * (weight[:, e] > 0).unsqueeze(-1) for e, ex in enumerate(block.experts)]
    return (contrib.view(b, t, -1, d).transpose(1, 2).reshape(b, len(block.experts), -1),
            [hd.view(b, t, -1).transpose(1, 2) for hd in hidden])


def _emitted(model, group, x):
    got = []
    src = Experts().u_sources(model, group)[0]
    handles = src.attach(dict(model.named_modules()), got.append)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hd in handles:
            hd.remove()
    assert len(got) == 1  # once per forward
    return got[0]


@pytest.mark.parametrize("shape", [SHAPE, (SHAPE[1],)], ids=["tokens", "flat"])
def test_u_sources_match_dense_oracle(shape):
    model = make(depth=1)
    x = fresh_inputs(shape, n=5)
    block = model.blocks[0].moe
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, i: seen.setdefault("h", i[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    with torch.no_grad():
        want_e, want_h = _oracle(block, seen["h"])
    experts = discovered(model, x)[0]
    got = _emitted(model, experts, x)
    assert got.shape == (5, 4, seen["h"].shape[1] * 16)
    torch.testing.assert_close(got, want_e, rtol=1e-5, atol=1e-6)
    # Zeros where a token went elsewhere: exactly top_k of the experts' slices are non-zero per token.
    per_token = got.view(5, 4, -1, 16).abs().sum(-1) > 0
    assert bool((per_token.sum(1) == block.top_k).all())
    for g in discovered(model, x, fp.moe_routers(model)):
        e = int(g.name.split(".")[4])
        torch.testing.assert_close(_emitted(model, g, x), want_h[e], rtol=1e-5, atol=1e-6)


def test_r_is_taylor_of_expert_params_and_router_row():
    model, data, scores = scored("experts", 2)
    work = copy.deepcopy(model)
    for x, y in data:
        F.cross_entropy(work(x), y).backward()
    block = work.blocks[1].moe
    terms = torch.stack([sum((p.grad * p).sum() for p in ex.parameters()) for ex in block.experts])
    terms = terms + (block.router.weight.grad * block.router.weight).sum(1)
    torch.testing.assert_close(scores["blocks.1.moe:experts"].r, terms.abs().detach(), rtol=1e-4, atol=1e-7)


def test_never_routed_expert_has_zero_u_and_goes_first():
    model = make(depth=1, router_bias=True)
    with torch.no_grad():
        model.blocks[0].moe.router.bias[2] = -1e4
    data = loader()
    scores = fp.score(model, data, data[0][0], projections=8)
    g = scores["blocks.0.moe:experts"]
    assert g.u[2] == 0 and bool((g.u[[0, 1, 3]] > 0).all())
    assert 2 in fp.plan(scores, alpha=0.5).removed["blocks.0.moe:experts"]


# ---------------------------------------------------------------- surgery

CASES = [("experts", 2, {"alpha": 0.3}), ("experts", 2, {"macs": 0.01}), ("experts", 2, {"params": 0.15}),
         ("hidden", 1, {"alpha": 0.3}), ("hidden", 1, {"macs": 0.3})]


@pytest.mark.parametrize("mode,depth,target", CASES, ids=[f"{m}{d}-{next(iter(t))}" for m, d, t in CASES])
def test_prune_equals_mask_and_predictions_are_exact(mode, depth, target):
    model, data, scores = scored(mode, depth)
    example = data[0][0]
    plan = fp.plan(scores, **target)
    pruned, _ = assert_prune_equals_mask(model, plan, fresh_inputs(SHAPE, n=5), example_inputs=example)
    moe_units = sum(len(v) for k, v in plan.removed.items() if k.endswith(":experts") or k.endswith(":hidden"))
    assert moe_units > 0
    assert fp.count_params(pruned) < fp.count_params(model)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, example) == plan.predicted["macs_after"]
    assert fp.count_macs(model, example) == plan.predicted["macs_before"]
    for b in moe_blocks(pruned):
        kept = len(b.module.experts)
        assert b.module.num_experts == kept == b.module.router.out_features >= b.module.top_k
        gone = plan.removed.get(f"{b.name}:experts", [])
        assert kept == 4 - len(gone)


def test_hidden_units_of_two_blocks_params_exact_macs_bounded():
    """Pruning block 0 changes the tokens block 1 routes; with unequal experts its MACs follow the routing. The
    prediction (routing of the example) and the measurement both lie within T * top_k * (max - min)."""
    model, data, scores = scored("hidden", 2)
    example = data[0][0]
    plan = fp.plan(scores, alpha=0.3)
    pruned = fp.prune(model, plan, example)
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    block = pruned.blocks[1].moe
    per_token = [2 * ex.fc1.in_features * ex.fc1.out_features for ex in block.experts]
    bound = SHAPE[0] * block.top_k * (max(per_token) - min(per_token))
    assert 0 < bound
    assert abs(fp.count_macs(pruned, example) - plan.predicted["macs_after"]) <= bound


@pytest.mark.parametrize("router_bias", [False, True], ids=["hooked-router", "router-bias"])
def test_masked_expert_is_never_routed(router_bias):
    model = make(depth=1, router_bias=router_bias)
    data = loader()
    gone = [1, 2]
    plan = removing(fp.plan(fp.score(model, data, data[0][0], projections=8), alpha=0.0),
                    "blocks.0.moe:experts", gone)
    masked = fp.mask(model, plan, data[0][0])
    logits = []
    masked.blocks[0].moe.router.register_forward_hook(lambda m, i, o: logits.append(o))
    x = fresh_inputs(SHAPE, n=5)
    with torch.no_grad():
        out = masked(x)
    assert bool(torch.isinf(logits[0][:, gone]).all()) and bool(torch.isfinite(logits[0][:, [
        e for e in range(4) if e not in gone]]).all())
    assert rel_err(fp.prune(model, plan, data[0][0])(x), out) < 1e-5


def test_plan_leaving_fewer_than_top_k_experts_is_refused():
    model, data, scores = scored("experts", 2)
    plan = removing(fp.plan(scores, alpha=0.0), "blocks.0.moe:experts", [0, 1, 3])
    with pytest.raises(fp.PlanError, match="top_k=2"):
        fp.prune(model, plan, data[0][0])
    with pytest.raises(fp.PlanError, match="at least 2 must remain"):
        fp.mask(model, plan, data[0][0])


def test_unequal_experts_refuse_expert_removal_with_the_fix():
    model, data, scores = scored("hidden", 1)
    pruned = fp.prune(model, fp.plan(scores, alpha=0.3), data[0][0])
    with pytest.raises(fp.UnsupportedModelError, match="differ in size.*blocks.0.moe.router"):
        fp.score(pruned, data, data[0][0], projections=8)
    again = fp.score(pruned, data, data[0][0], projections=8, ignore=fp.moe_routers(pruned))
    assert any(n.endswith(":hidden") for n in again.names)


@pytest.mark.parametrize("mode", ["experts", "hidden"])
def test_save_load_round_trip_and_caller_model_unchanged(mode, tmp_path):
    model, data, scores = scored(mode, 1 if mode == "hidden" else 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fp.plan(scores, alpha=0.3)
    pruned = fp.prune(model, plan, data[0][0])
    fp.mask(model, plan, data[0][0])
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    fp.save(tmp_path / "moe.pt", pruned, plan)
    loaded = fp.load(tmp_path / "moe.pt", make(depth=1 if mode == "hidden" else 2, seed=5))
    x = fresh_inputs(SHAPE, n=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


# ---------------------------------------------------------------- a Mixtral-style block

class SwiGLU(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralLike(nn.Module):
    """Hugging Face's MixtralSparseMoeBlock, shortened: softmax, top-k, renormalise; slot-ordered dispatch."""

    def __init__(self, d, h, num_experts=4, top_k=2, scale=1.0):
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, h) for _ in range(num_experts))
        self.num_experts, self.top_k, self.scale = num_experts, top_k, scale

    def forward(self, x):
        b, t, d = x.shape
        hs = x.view(-1, d)
        w = F.softmax(self.gate(hs), dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(hs)
        mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            y = self.experts[e](hs[None, top_x].reshape(-1, d) * self.scale) * w[top_x, idx, None]
            out.index_add_(0, top_x, y)
        return out.view(b, t, d)


class MixtralNet(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.embed = nn.Linear(SHAPE[1], 16)
        self.norm = nn.LayerNorm(16)
        self.moe = MixtralLike(16, 20, scale=scale)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        return self.head((h + self.moe(self.norm(h))).mean(1))


@pytest.mark.parametrize("mode", ["experts", "hidden"])
def test_mixtral_style_block(mode):
    torch.manual_seed(1)
    model = MixtralNet().eval()
    data = loader()
    ignore = fp.moe_routers(model) if mode == "hidden" else []
    assert fp.moe_routers(model) == ["moe.gate"]
    scores = fp.score(model, data, data[0][0], projections=8, ignore=ignore)
    if mode == "hidden":
        assert scores.names == [f"moe.experts.{e}.w1:hidden" for e in range(4)]
    plan = fp.plan(scores, alpha=0.5)
    assert plan.units_removed > 0
    pruned, _ = assert_prune_equals_mask(model, plan, fresh_inputs(SHAPE, n=5), example_inputs=data[0][0])
    assert fp.count_params(pruned) == plan.predicted["params_after"]
    assert fp.count_macs(pruned, data[0][0]) == plan.predicted["macs_after"]
    if mode == "hidden":
        ex = pruned.moe.experts[0]
        assert ex.w1.out_features == ex.w3.out_features == ex.w2.in_features < 20


def test_block_breaking_the_dispatch_convention_is_refused():
    torch.manual_seed(1)
    model = MixtralNet(scale=2.0).eval()  # experts receive scaled rows, not the routed tokens
    data = loader()
    with pytest.raises(fp.UnsupportedModelError, match="did not receive the rows"):
        fp.score(model, data, data[0][0], projections=8)
