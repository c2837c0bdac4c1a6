"""NaN tagging: which input positions of which layers read which hidden unit of a recurrent module.

The units whose global index has bit ``b`` equal to ``v`` are set to NaN in the module's outputs, one forward
per ``(b, v)``; every parametrised layer records the NaN positions of its input and passes zeros on. A position
read by one unit is NaN in exactly one pass of each bit pair, and its pattern spells the unit's index; anything
else (a LayerNorm or a sum over the hidden dimension) is caught.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..._core.inputs import logits_of
from ..._core.layers import CONV_TYPES
from ..._core.state import eval_mode
from ..._errors import UnsupportedModelError
from .layers import directions

__all__ = ["probe"]


def probe(model: nn.Module, name: str, mod: nn.RNNBase, x: tuple) -> Tuple[Dict[str, torch.Tensor], int]:
    """NaN tagging of ``mod``'s hidden units.

    Returns:
        input position -> global unit index (-1: reads none) of every parametrised module that reads a unit
        (key "" for the model output), and the sequence length of ``mod``'s input.

    Raises:
        UnsupportedModelError: a position reads several units, or the module gets an initial state, a packed
            sequence, or runs more than once per forward.
    """
    tagger = _Tagger(name, mod)
    handles = tagger.install(model)
    try:
        with eval_mode(model), torch.no_grad():
            tagger.run_passes(model, x)
    finally:
        for h in handles:
            h.remove()
    return tagger.decode(), tagger.steps


class _Tagger:
    """The hooks of one probe and what they recorded."""

    def __init__(self, name: str, mod: nn.RNNBase) -> None:
        self.name, self.mod = name, mod
        self.layers, self.h, self.d = mod.num_layers, mod.hidden_size, directions(mod)
        n = self.layers * self.h
        self.bits = max(1, (n - 1).bit_length())
        self.ids = torch.arange(n)
        self.chosen = self.ids < 0
        self.calls = self.steps = self.pass_no = 0
        self.seen: Dict[str, torch.Tensor] = {}  # module -> (passes, positions) bool

    def install(self, model: nn.Module) -> List[Any]:
        handles = [self.mod.register_forward_pre_hook(self.check, with_kwargs=True),
                   self.mod.register_forward_hook(self.tag)]
        for other_name, other in model.named_modules():
            if other is not self.mod and any(True for _ in other.parameters(recurse=False)):
                dim = 1 if isinstance(other, CONV_TYPES) else -1  # the reader's feature dimension
                handles.append(other.register_forward_pre_hook(self.reader(other_name, dim), with_kwargs=True))
        return handles

    def check(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        inp = args[0] if args else kwargs.get("input")
        if isinstance(inp, nn.utils.rnn.PackedSequence):
            raise UnsupportedModelError(f"Layer '{self.name}' is given a PackedSequence; packed sequences are not "
                                        "supported by the recurrent pruning. Pad the batch (same length) instead.")
        if (len(args) > 1 and args[1] is not None) or kwargs.get("hx") is not None:
            raise UnsupportedModelError(
                f"Layer '{self.name}' is given an initial state (h0/c0). Pruning removes hidden units, which "
                "equals zeroing them only from a zero initial state: call the layer without hx.")
        self.calls += 1
        self.steps = inp.shape[1 if self.mod.batch_first else 0]
        if self.calls > 1:
            raise UnsupportedModelError(f"Layer '{self.name}' runs more than once per forward pass; shared "
                                        "recurrent layers cannot be pruned. Add it to `ignore=`.")

    def tag(self, m: nn.Module, args: tuple, out: Any) -> Any:
        chosen = self.chosen.view(self.layers, self.h)
        seq, st = out
        seq = seq.clone()
        last = chosen[-1].nonzero().flatten()
        seq[..., (torch.arange(self.d)[:, None] * self.h + last[None]).flatten().to(seq.device)] = float("nan")
        tagged = []
        for s in (st if isinstance(st, tuple) else (st,)):
            s = s.clone().view(self.layers, self.d, *s.shape[1:])
            s[chosen.to(s.device)[:, None, None, :].expand_as(s)] = float("nan")
            tagged.append(s.flatten(0, 1))
        return seq, (tuple(tagged) if isinstance(st, tuple) else tagged[0])

    def reader(self, key: str, dim: int):
        def hook(m, args, kwargs):
            return tuple(self.record(key, dim, a) for a in args), {k: self.record(key, dim, v)
                                                                    for k, v in kwargs.items()}
        return hook

    def record(self, key: str, dim: int, a: Any) -> Any:
        if not (torch.is_tensor(a) and a.is_floating_point() and a.dim()):
            return a
        nan = torch.isnan(a)
        if not bool(nan.any()):
            return a
        width = a.shape[dim] if -a.dim() <= dim < a.dim() else 1
        if key not in self.seen:
            self.seen[key] = torch.zeros(2 * self.bits, width, dtype=torch.bool)
        if self.seen[key].shape[1] != width:  # several inputs of different widths: only "which units" counts
            self.seen[key] = self.seen[key].any(1, keepdim=True)
            width = 1
        hit = nan.movedim(dim, -1).reshape(-1, width).any(0) if width > 1 else nan.any().view(1)
        self.seen[key][self.pass_no] |= hit.cpu()
        return torch.where(nan, torch.zeros_like(a), a)  # the unit is gone past the layers that read it

    def run_passes(self, model: nn.Module, x: tuple) -> None:
        for b in range(self.bits):
            for v in (0, 1):
                self.pass_no = 2 * b + v
                self.chosen, self.calls = ((self.ids >> b) & 1) == v, 0
                out = logits_of(model(*x))
                nan = torch.isnan(out)
                if bool(nan.any()):
                    if "" not in self.seen:
                        self.seen[""] = torch.zeros(2 * self.bits, out.shape[-1], dtype=torch.bool)
                    self.seen[""][self.pass_no] |= nan.reshape(-1, out.shape[-1]).any(0).cpu()

    def decode(self) -> Dict[str, torch.Tensor]:
        decoded = {}
        for key, rec in self.seen.items():
            rec = rec.view(self.bits, 2, -1)
            zeros, ones = rec[:, 0], rec[:, 1]
            read = (zeros | ones).any(0)
            bad = read & ~(zeros ^ ones).all(0)
            if key == "" and bool(bad.any()):
                decoded[key] = self.ids  # units mixed into the model output: all of them reach it
                continue
            if bool(bad.any()):
                raise UnsupportedModelError(
                    f"The hidden units of '{self.name}' are mixed before layer '{key}' reads them (a "
                    "normalisation, sum or attention over the hidden dimension); such units cannot be removed one "
                    f"by one. Add '{self.name}' to `ignore=`.")
            unit = (ones.long() << torch.arange(self.bits)[:, None]).sum(0)
            decoded[key] = torch.where(read, unit, torch.full_like(unit, -1))
        return decoded
