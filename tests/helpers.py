"""Small builders and checks shared by the tests (imported as ``helpers``: pytest puts ``tests/`` on the path)."""
import copy
import inspect

import torch
from torch import nn

import fairpruner as fp


def tiny_loader(shape, classes=4, per=4, batch=8, seed=0):
    """A list of (inputs, labels) batches: ``per`` random samples of each of ``classes`` classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * per, *shape, generator=g)
    y = torch.arange(classes).repeat_interleave(per)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def fresh_inputs(shape, n: int = 3, seed: int = 99) -> torch.Tensor:
    """``n`` random inputs of per-sample ``shape``, drawn apart from the calibration data."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def _output(model: nn.Module, x):
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    out = getattr(out, "logits", out)  # Hugging Face models
    return out[0] if isinstance(out, (tuple, list)) else out


def assert_prune_equals_mask(model: nn.Module, plan, x, rtol: float = 1e-5, *, pruned=None, example_inputs=None):
    """The physically pruned model computes on ``x`` what the same-shape model with the plan's units zeroed
    computes, to ``rtol`` relative to the largest output. ``x`` may be a tuple of positional inputs.

    Args:
        pruned: an already pruned model to check (a cached case); by default ``fp.prune(model, plan)``.
        example_inputs: what prune and mask trace with; by default ``x``.

    Returns:
        ``(pruned, masked)``.
    """
    example = x if example_inputs is None else example_inputs
    pruned = fp.prune(model, plan, example) if pruned is None else pruned
    masked = fp.mask(model, plan, example)
    a, b = _output(pruned, x), _output(masked, x)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert rel_err(a, b) <= rtol, rel_err(a, b)
    return pruned, masked


class Scored:
    """Each model of a test module scored once, so that parametrised tests share one ``fp.score`` run.

    ``setup(*key)`` returns ``(model, loader, keyword arguments of fp.score)``; calling the instance with a key
    returns ``(model, loader, scores)``, and :meth:`case` adds a plan and the pruned model. Keys are the setup's
    arguments with its defaults filled in, so ``scored("vit")`` and ``scored("vit", "heads")`` share a run.

    Args:
        setup: builds one case.
        targets: target name -> keyword arguments of ``fp.plan``, for :meth:`case`.
        projections: ``fp.score``'s projections unless the setup gives its own.
        snapshot: keep a copy of each model's state_dict from before scoring (:meth:`state_before`).
    """

    def __init__(self, setup, targets=None, projections: int = 8, snapshot: bool = False):
        self.setup, self.targets, self.projections, self.snapshot = setup, dict(targets or {}), projections, snapshot
        self._signature = inspect.signature(setup)
        self._scored, self._cases, self._before = {}, {}, {}

    def _key(self, args, kwargs) -> tuple:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    def __call__(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key not in self._scored:
            model, loader, score_kwargs = self.setup(*key)
            if self.snapshot:
                self._before[key] = copy.deepcopy(model.state_dict())
            scores = fp.score(model, loader, **{"projections": self.projections, **score_kwargs})
            self._scored[key] = (model, loader, scores)
        return self._scored[key]

    def case(self, *args, target: str, **kwargs):
        """``(model, scores, plan, pruned)``: the scored case planned with ``targets[target]`` and pruned."""
        key = self._key(args, kwargs)
        if (key, target) not in self._cases:
            model, _, scores = self(*key)
            plan = fp.plan(scores, **self.targets[target])
            self._cases[key, target] = (model, scores, plan, fp.prune(model, plan))
        return self._cases[key, target]

    def state_before(self, *args, **kwargs) -> dict:
        """The model's state_dict as it was before scoring (needs ``snapshot=True``)."""
        key = self._key(args, kwargs)
        self(*key)
        return self._before[key]


def snapshot(model: nn.Module) -> dict:
    """What a call on the caller's model must leave as it was: state, every submodule's train/eval flag,
    requires_grad, .grad, the global RNG and the grad mode."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": [p.grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_unchanged(model: nn.Module, snap: dict, step: str = "") -> None:
    """``model`` is as :func:`snapshot` found it (``step`` names the call in the message)."""
    now = snapshot(model)
    assert list(now["state"]) == list(snap["state"]), step
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{step}: {k} changed"
    assert now["training"] == snap["training"], step
    assert now["requires_grad"] == snap["requires_grad"], step
    assert all(g is None for g in now["grads"]), f"{step}: .grad created"
    assert torch.equal(now["rng"], snap["rng"]), f"{step}: global RNG advanced"
    assert now["grad_mode"] == snap["grad_mode"], step


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial normalisation statistics and affine parameters, so that zeroing a unit matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(7)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


class CountingLoader:
    """A re-iterable loader that records how many batches were drawn (errors must come before any)."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


def last_token_loss(classes: int):
    """A causal LM scored on a task's classes: the class is read from the last position's first logits."""
    return lambda logits, targets: torch.nn.functional.cross_entropy(logits[:, -1, :classes], targets)


def generated_pruned_and_masked(model: nn.Module, plan, prompt: torch.Tensor, new_tokens: int) -> list:
    """Greedy ``generate()`` of the pruned and of the masked causal LM, each with its key/value cache (shaped,
    in the pruned model, by the kept units)."""
    runs = []
    for m in (fp.prune(model, plan), fp.mask(model, plan)):
        m.config.use_cache = True
        runs.append(m.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0))
    return runs


def assert_scores_equal(a, b) -> None:
    """Two Scores hold the same groups with the same U, R and L1 (to float tolerance) and unit layout."""
    assert a.names == b.names
    for ga, gb in zip(a.groups, b.groups):
        torch.testing.assert_close(ga.u, gb.u, rtol=1e-6, atol=0)
        torch.testing.assert_close(ga.r, gb.r, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ga.l1, gb.l1, rtol=0, atol=0)
        assert torch.equal(ga.unit_channels, gb.unit_channels)


def predicted_removed(p, key: str) -> float:
    """The fraction of params or MACs (``key``) a plan predicts it removes."""
    return 1 - p.predicted[f"{key}_after"] / p.predicted[f"{key}_before"]
