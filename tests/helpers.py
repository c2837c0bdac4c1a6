"""Small builders and checks shared by the tests."""
import torch
from torch import nn

import fairpruner as fp


def tiny_loader(shape, classes=4, per=4, batch=8, seed=0):
    """A list of (inputs, labels) batches: ``per`` random samples of each of ``classes`` classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * per, *shape, generator=g)
    y = torch.arange(classes).repeat_interleave(per)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def assert_prune_equals_mask(model: nn.Module, plan, x, rtol: float = 1e-5):
    """The physically pruned model computes what the same-shape model with the units zeroed computes."""
    pruned, masked = fp.prune(model, plan, x), fp.mask(model, plan, x)
    with torch.no_grad():
        a, b = pruned(x), masked(x)
    a, b = (getattr(t, "logits", t) for t in (a, b))
    a, b = (t[0] if isinstance(t, (tuple, list)) else t for t in (a, b))
    assert a.shape == b.shape and rel_err(a, b) <= rtol, rel_err(a, b)
    return pruned, masked


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
