"""Hidden units of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) as a unit family."""
from .family import RecurrentFamily
from .layers import RecurrentStack

__all__ = ["RecurrentFamily", "RecurrentStack"]
