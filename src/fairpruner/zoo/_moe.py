"""A small mixture-of-experts classifier: top-k routed expert MLPs in pre-norm residual blocks.

Routing follows Mixtral: the router scores every expert, each token goes to its ``top_k`` best experts, and
their outputs are weighted by a softmax over those ``top_k`` logits (identical to Mixtral's softmax over all
experts, top-k, renormalise). Dispatch is vectorised per expert: the loop runs over experts, each expert is
called once per forward on the rows of the tokens routed to it, in ascending token order (the convention
:mod:`fairpruner._experts` relies on).
"""

from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn

from ._common import init_weights

__all__ = ["Expert", "MoE", "MoEClassifier", "moe_classifier"]


class Expert(nn.Module):
    """One expert: ``fc2(activation(fc1(x)))``.

    Args:
        dim: Token width.
        hidden: Hidden width.
        activation: Factory of the activation module.
    """

    def __init__(self, dim: int, hidden: int, activation: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MoE(nn.Module):
    """Mixture-of-experts feed-forward block with top-k routing.

    Args:
        dim: Token width (input and output).
        hidden: Hidden width of every expert.
        num_experts: Number of experts.
        top_k: Experts per token.
        activation: Factory of the experts' activation module.
        router_bias: Give the router a bias (Mixtral's router has none).

    Attributes:
        router: ``Linear(dim, num_experts)``: one logit per expert and token.
        experts: ``ModuleList`` of :class:`Expert`.
        num_experts: ``len(experts)``, kept up to date by pruning.
        top_k: Experts per token.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 4, top_k: int = 2,
                 activation: Callable[[], nn.Module] = nn.GELU, router_bias: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=router_bias)
        self.experts = nn.ModuleList(Expert(dim, hidden, activation) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        weights, chosen = logits.topk(self.top_k, dim=-1)
        weights = weights.softmax(-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            hit = chosen == e                                   # (tokens, top_k): at most one True per row
            rows = hit.any(-1).nonzero().flatten()              # ascending token order
            gate = (weights * hit).sum(-1).index_select(0, rows)
            # Called even with no rows, so that tracing always sees every expert.
            y = expert(tokens.index_select(0, rows))
            out = out.index_add(0, rows, y * gate.unsqueeze(-1))
        return out.reshape(x.shape)


class _Block(nn.Module):
    def __init__(self, dim: int, moe: MoE) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


class MoEClassifier(nn.Module):
    """Token embedding, pre-norm residual MoE blocks, mean pooling and an MLP head.

    Inputs are token sequences ``(B, T, in_features)`` or flat features ``(B, in_features)`` (one token).

    Args:
        in_features: Width of each input token.
        dim: Width of the residual stream.
        hidden: Hidden width of every expert.
        num_experts: Experts per block.
        top_k: Experts per token.
        depth: Number of MoE blocks.
        num_classes: Number of output logits.
        router_bias: Give the routers a bias.
    """

    def __init__(self, in_features: int = 16, dim: int = 32, hidden: int = 48, num_experts: int = 4,
                 top_k: int = 2, depth: int = 2, num_classes: int = 10, router_bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        blocks: List[nn.Module] = [_Block(dim, MoE(dim, hidden, num_experts, top_k, router_bias=router_bias))
                                   for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))
        init_weights(self)
        for m in self.modules():
            if isinstance(m, MoE):
                # Kaiming fan-out init makes router logits large; a smaller router spreads tokens over experts.
                nn.init.normal_(m.router.weight, std=dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D) -> (B, 1, D); (B, T, D) unchanged. A reshape, not a branch, so that torch.fx can trace it.
        h = self.embed(x.reshape(x.shape[0], -1, x.shape[-1]))
        h = self.norm(self.blocks(h))
        return self.head(h.mean(1))


def moe_classifier(**kwargs) -> MoEClassifier:
    """Builds :class:`MoEClassifier` (keyword arguments as there)."""
    return MoEClassifier(**kwargs)
