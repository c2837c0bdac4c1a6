"""Recurrent sequence classifiers: LSTM/GRU over float feature sequences, linear head."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RecurrentClassifier", "lstm_classifier", "gru_classifier"]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
_HEADS = ("last", "hn", "mean")


class RecurrentClassifier(nn.Module):
    """An LSTM or GRU over a ``(batch, time, features)`` sequence, then a linear head.

    The model's input is batch-first whatever ``batch_first`` says; with ``batch_first=False`` the recurrent
    layer itself runs time-first (the input is transposed for it).

    Args:
        cell: "lstm" or "gru".
        input_size: features per time step.
        hidden_size: hidden units per layer and direction.
        num_layers: stacked recurrent layers.
        num_classes: number of output logits.
        bidirectional: run both directions; the head reads both.
        head: what the head reads: "last" (the output at the last time step), "hn" (the last layer's final
            hidden state, both directions concatenated) or "mean" (the output averaged over time).
        batch_first: layout of the recurrent layer.
        dropout: dropout between recurrent layers (training only).
    """

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 12,
        hidden_size: int = 48,
        num_layers: int = 2,
        num_classes: int = 10,
        bidirectional: bool = False,
        head: str = "last",
        batch_first: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
        if head not in _HEADS:
            raise ValueError(f"head must be one of {_HEADS}, got {head!r}")
        self.head, self.batch_first, self.bidirectional = head, batch_first, bidirectional
        self.is_lstm = cell == "lstm"  # a plain flag: the layer may be replaced by a RecurrentStack when pruned
        self.rnn = _CELLS[cell](input_size, hidden_size, num_layers=num_layers, batch_first=batch_first,
                                bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = res[0] if self.batch_first else res[0].transpose(0, 1)  # (batch, time, features)
        if self.head == "last":
            z = out[:, -1]
        elif self.head == "mean":
            z = out.mean(1)
        else:
            h = res[1][0] if self.is_lstm else res[1]
            z = torch.cat([h[-2], h[-1]], 1) if self.bidirectional else h[-1]
        return self.fc(z)


def lstm_classifier(**kwargs) -> RecurrentClassifier:
    """LSTM sequence classifier; input ``(batch, 16, 12)`` with the defaults (see :class:`RecurrentClassifier`)."""
    return RecurrentClassifier("lstm", **kwargs)


def gru_classifier(**kwargs) -> RecurrentClassifier:
    """GRU sequence classifier; input ``(batch, 16, 12)`` with the defaults (see :class:`RecurrentClassifier`)."""
    return RecurrentClassifier("gru", **kwargs)
