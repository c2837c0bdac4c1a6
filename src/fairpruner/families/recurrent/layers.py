"""Layer-level pieces of recurrent pruning: parameter names, cutting hidden units and input columns out of
``nn.LSTM``/``nn.GRU``/``nn.RNN`` layers, and :class:`RecurrentStack`, the replacement for a multi-layer module
whose layers keep different numbers of units (see :mod:`fairpruner._recurrent`)."""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import _VF, nn

from ..._core.layers import CONV_TYPES, kept

__all__ = ["RecurrentStack", "RNN_TYPES", "GATES", "directions", "param_names", "set_param",
           "input_width", "cut_input_", "new_like", "split_layers", "join_layers", "cut_hidden_",
           "run_layers", "per_unit"]

RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def directions(mod: nn.Module) -> int:
    """2 for a bidirectional layer, else 1."""
    return 2 if mod.bidirectional else 1


def _sfx(mod: nn.Module) -> Tuple[str, ...]:
    return ("", "_reverse") if mod.bidirectional else ("",)


def param_names(mod: nn.RNNBase, k: int, kinds: Sequence[str] = _KINDS) -> List[str]:
    """Parameter names of layer ``k``, in ``_flat_weights`` order (per direction: w_ih, w_hh, b_ih, b_hh)."""
    return [f"{kind}_l{k}{s}" for s in _sfx(mod) for kind in kinds if f"{kind}_l{k}{s}" in mod._parameters]


class RecurrentStack(nn.Module):
    """The layers of a pruned ``nn.LSTM``/``nn.GRU``/``nn.RNN`` whose hidden sizes differ.

    Called like the module it replaces: ``stack(input, hx=None) -> (output, h_n)``, ``(output, (h_n, c_n))`` for
    LSTM. ``h_n`` and ``c_n`` are tuples of ``(batch, H_k)`` tensors, one per layer and direction in
    ``nn.LSTM``'s order (``h_n[-1]`` is the last layer's last direction); ``hx`` takes the same form.

    Args:
        layers: single-layer modules of one type, each reading the previous one's output.
        dropout: dropout on the outputs of every layer but the last, in training mode (as ``nn.LSTM`` does).
    """

    def __init__(self, layers: Sequence[nn.RNNBase], dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = float(dropout)
        first = self.layers[0]
        self.mode, self.batch_first, self.bidirectional = first.mode, first.batch_first, first.bidirectional
        self.bias, self.num_layers = first.bias, len(self.layers)

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def hidden_sizes(self) -> Tuple[int, ...]:
        return tuple(layer.hidden_size for layer in self.layers)

    @property
    def hidden_size(self) -> int:
        """The last layer's hidden size (the output has ``hidden_size * directions`` features)."""
        return self.layers[-1].hidden_size

    def forward(self, input: torch.Tensor, hx: Any = None) -> Tuple[torch.Tensor, Any]:
        d, lstm = directions(self), self.mode == "LSTM"
        out, hs, cs = input, [], []
        for k, layer in enumerate(self.layers):
            state = None
            if hx is not None:
                h0 = torch.stack(tuple((hx[0] if lstm else hx)[k * d:(k + 1) * d]))
                state = (h0, torch.stack(tuple(hx[1][k * d:(k + 1) * d]))) if lstm else h0
            out, st = layer(out, state)
            hs.extend((st[0] if lstm else st).unbind(0))
            if lstm:
                cs.extend(st[1].unbind(0))
            if self.dropout and self.training and k < self.num_layers - 1:
                out = F.dropout(out, self.dropout, True)
        return out, ((tuple(hs), tuple(cs)) if lstm else tuple(hs))


# ------------------------------------------------------------------------------------------------ surgery

def set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replaces a parameter by ``value``, keeping its ``requires_grad``."""
    old = getattr(mod, name)
    setattr(mod, name, nn.Parameter(value.detach().contiguous(), requires_grad=old.requires_grad))


def input_width(mod: nn.Module) -> int:
    """Input features of a Linear, Conv, recurrent layer or :class:`RecurrentStack`."""
    if isinstance(mod, RecurrentStack):
        mod = mod.layers[0]
    if isinstance(mod, nn.Linear):
        return mod.in_features
    if isinstance(mod, CONV_TYPES):
        return mod.in_channels
    return mod.input_size


def cut_input_(mod: nn.Module, positions: torch.Tensor) -> None:
    """Removes input ``positions`` (columns) of a Linear, Conv or recurrent consumer."""
    if isinstance(mod, RecurrentStack):
        mod = mod.layers[0]
    keep = kept(input_width(mod), positions).to(next(mod.parameters()).device)
    with torch.no_grad():
        if isinstance(mod, (nn.Linear,) + CONV_TYPES):
            set_param(mod, "weight", mod.weight.index_select(1, keep))
            if isinstance(mod, nn.Linear):
                mod.in_features = keep.numel()
            else:
                mod.in_channels = keep.numel()
            return
        for name in param_names(mod, 0, ("weight_ih",)):
            set_param(mod, name, getattr(mod, name).index_select(1, keep))
        mod.input_size = keep.numel()
        mod.flatten_parameters()


def new_like(mod: nn.RNNBase, input_size: int, hidden: int, layers: int = 1, dropout: float = 0.0) -> nn.RNNBase:
    """A module of ``mod``'s type and options with other sizes (its parameters are meant to be replaced)."""
    kw = dict(num_layers=layers, bias=mod.bias, batch_first=mod.batch_first, bidirectional=mod.bidirectional,
              dropout=dropout)
    if isinstance(mod, nn.RNN):
        kw["nonlinearity"] = mod.nonlinearity
    new = type(mod)(input_size, hidden, **kw)
    return new.to(next(mod.parameters()).device)


def split_layers(mod: nn.Module) -> List[nn.RNNBase]:
    """One single-layer module per layer, holding that layer's parameters (the module's own ones)."""
    if isinstance(mod, RecurrentStack):
        return list(mod.layers)
    if mod.num_layers == 1:
        return [mod]
    out = []
    for k in range(mod.num_layers):
        one = new_like(mod, getattr(mod, f"weight_ih_l{k}").shape[1], mod.hidden_size)
        for name in param_names(mod, k):
            setattr(one, name.replace(f"_l{k}", "_l0"), getattr(mod, name))
        out.append(one)
    return out


def join_layers(layers: List[nn.RNNBase], dropout: float) -> nn.Module:
    """A multi-layer module where every layer kept the same number of units, else a :class:`RecurrentStack`."""
    if len(layers) == 1:
        return layers[0]
    if len({layer.hidden_size for layer in layers}) > 1:
        return RecurrentStack(layers, dropout)
    first = layers[0]
    joined = new_like(first, first.input_size, first.hidden_size, len(layers), dropout)
    for k, layer in enumerate(layers):
        for name in param_names(layer, 0):
            setattr(joined, name.replace("_l0", f"_l{k}"), getattr(layer, name))
    return joined


def cut_hidden_(layers: List[nn.RNNBase], k: int, removed: torch.Tensor) -> None:
    """Removes hidden units ``removed`` of layer ``k``: gate rows, recurrent columns, next layer's inputs."""
    layer = layers[k]
    n, d, gates = layer.hidden_size, directions(layer), GATES[layer.mode]
    dev = next(layer.parameters()).device
    keep = kept(n, removed)
    rows = (torch.arange(gates)[:, None] * n + keep[None]).flatten().to(dev)
    with torch.no_grad():
        for name in param_names(layer, 0):
            p = getattr(layer, name).index_select(0, rows)
            set_param(layer, name, p.index_select(1, keep.to(dev)) if name.startswith("weight_hh") else p)
        layer.hidden_size = keep.numel()
        if k + 1 < len(layers):
            nxt = layers[k + 1]
            cols = (torch.arange(d)[:, None] * n + keep[None]).flatten().to(dev)
            for name in param_names(nxt, 0, ("weight_ih",)):
                set_param(nxt, name, getattr(nxt, name).index_select(1, cols))
            nxt.input_size = cols.numel()


# --------------------------------------------------------------------------------------- U and layer outputs

def run_layers(mod: nn.RNNBase, x: torch.Tensor, upto: int) -> torch.Tensor:
    """Output sequence of layer ``upto`` of a multi-layer module (zero initial state, eval semantics)."""
    fn = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[mod.mode]
    out = x
    for k in range(upto + 1):
        h0 = out.new_zeros(directions(mod), out.shape[0 if mod.batch_first else 1], mod.hidden_size)
        weights = [getattr(mod, n) for n in param_names(mod, k)]
        hx = (h0, h0) if mod.mode == "LSTM" else h0
        out = fn(out, hx, weights, mod.bias, 1, 0.0, False, mod.bidirectional, mod.batch_first)[0]
    return out


def per_unit(seq: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """(B, T, D * H) (or time-first) -> (B, H, T * D): each unit's values over time steps and directions."""
    if not mod.batch_first:
        seq = seq.transpose(0, 1)
    b, t, _ = seq.shape
    return seq.reshape(b, t, directions(mod), -1).permute(0, 3, 1, 2).flatten(2)
