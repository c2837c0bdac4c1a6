"""Tests for fairpruner._graph's bounds: torch-pruning's graph exploration runs under a time limit, and a failure
inside torch-pruning reaches the user as a clear refusal, never as a crash or a hang."""
import time

import pytest
import torch
from torch import nn

import fairpruner as fp
from fairpruner import zoo
from fairpruner._graph import SECONDS_ENV, build_graph


def _llama(use_cache: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      num_labels=3, pad_token_id=0, use_cache=use_cache)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(1, 64, (12, 8), generator=g), torch.arange(12) % 3)]


def test_graph_exploration_that_runs_too_long_is_refused_in_time(monkeypatch):
    import torch_pruning as tp

    def endless(self, *args, **kwargs):  # an exploration that never ends (as a Llama's did before its family)
        while True:
            time.sleep(0.01)
            yield from ()

    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", endless)
    monkeypatch.setenv(SECONDS_ENV, "2")
    start = time.perf_counter()
    with pytest.raises(fp.UnsupportedModelError, match=f"did not finish in 2 s.*{SECONDS_ENV}"):
        fp.score(zoo.resnet20().eval(), [(torch.randn(8, 3, 32, 32), torch.arange(8) % 2)], samples_per_class=4,
                 progress=False)
    assert time.perf_counter() - start < 30


def test_a_failure_inside_torch_pruning_is_a_clear_refusal(monkeypatch):
    import torch_pruning as tp

    def broken(self, *args, **kwargs):
        raise AttributeError("'tuple' object has no attribute 'grad_fn'")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", broken)
    with pytest.raises(fp.UnsupportedModelError, match="Tracing .* failed inside torch-pruning.*ignore="):
        fp.score(_llama(use_cache=False), _batch(), samples_per_class=4, progress=False)


def test_the_bound_leaves_the_alarm_as_it_was(monkeypatch):
    import signal
    monkeypatch.setenv(SECONDS_ENV, "30")
    before = signal.getsignal(signal.SIGALRM)
    build_graph(zoo.resnet20().eval(), torch.randn(2, 3, 32, 32))
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_model_of_unknown_weight_layers_is_refused_naming_them():
    class Transposed(nn.Module):  # a weight layer of a kind torch-pruning and fairpruner do not know
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)

        def forward(self, x):
            return x @ self.weight

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(64, 16), Transposed(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.relu(self.mix(self.emb(x))).mean(1))

    torch.manual_seed(0)
    with pytest.raises(fp.FairPrunerError, match="kinds fairpruner does not prune.*Transposed"):
        fp.score(Net().eval(), _batch(), samples_per_class=4, progress=False)
