"""Tests for fairpruner._scoring.budget and .passes: the U sample store under max_memory (exact passes over slices
of units, small maps kept unprojected), its refusals, and the class-pair search."""
import os

import pytest
import torch

import fairpruner as fp
from fairpruner._scoring import budget as budget_module
from fairpruner import zoo
from fairpruner._scoring.budget import SiteSize, parse_memory, plan_passes
from fairpruner._scoring.wasserstein import max_pairwise_w1
from helpers import randomize_norms, tiny_loader


def _model():
    torch.manual_seed(0)
    return randomize_norms(zoo.resnet20(), 0).eval()


def _batches(classes=10, per=6, batch=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(classes * per, 3, 16, 16, generator=g)
    y = torch.arange(classes * per) % classes
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


@pytest.fixture(scope="module")
def unbounded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (the autouse fixture comes after module fixtures)
    try:
        return fp.score(_model(), _batches(), samples_per_class=6, projections=32, progress=False)
    finally:
        torch.set_num_threads(threads)


def _same(a, b):
    return all(torch.equal(ga.u, gb.u) and torch.equal(ga.r, gb.r) and torch.equal(ga.l1, gb.l1)
               for ga, gb in zip(a.groups, b.groups))


def test_parse_memory():
    assert parse_memory("2GB") == 2 * 10 ** 9
    assert parse_memory("1.5 GiB") == int(1.5 * 2 ** 30)
    assert parse_memory("512mb") == 512 * 10 ** 6
    assert parse_memory(4096) == 4096
    for bad in ("lots", "-1GB", 0, True, "3 parsecs"):
        with pytest.raises(fp.FairPrunerError, match="max_memory"):
            parse_memory(bad)


def test_a_large_budget_is_one_pass_and_records_it(unbounded):
    store = unbounded.meta["u_store"]
    assert store["passes"] == 1 and store["unprojected_sites"] == 0 and store["class_pairs"] == "all"
    assert store["peak_bytes"] > 0


@pytest.mark.parametrize("budget", ["300kB", "100kB"])
def test_a_binding_budget_gives_identical_scores_within_it(unbounded, budget):
    s = fp.score(_model(), _batches(), samples_per_class=6, projections=32, progress=False, max_memory=budget)
    store = s.meta["u_store"]
    assert store["passes"] > 1
    assert store["unprojected_sites"] > 0  # resnet20's 4x4 maps at 16x16 inputs are smaller than 32 projections
    assert store["peak_bytes"] <= parse_memory(budget) * 3 // 4 < unbounded.meta["u_store"]["peak_bytes"]
    assert _same(s, unbounded)  # exact: the same products, sorted and compared the same way


def test_too_small_a_budget_is_refused_before_the_pass_naming_the_smallest():
    batches = _batches()
    with pytest.raises(fp.FairPrunerError, match="smallest budget that works is") as e:
        fp.score(_model(), batches, samples_per_class=6, projections=32, progress=False, max_memory="1kB")
    smallest = int(str(e.value).split("works is ")[1].split(" bytes")[0])
    fp.score(_model(), batches, samples_per_class=6, projections=32, progress=False, max_memory=smallest)


def test_several_passes_need_a_loader_that_can_be_read_again():
    with pytest.raises(fp.FairPrunerError, match="one-shot iterator"):
        fp.score(_model(), iter(_batches()), samples_per_class=6, projections=32, progress=False,
                 max_memory="100kB")


def test_a_loader_that_changes_between_passes_is_refused():
    class Reshuffling:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return len(_batches())

        def __iter__(self):
            batches = _batches()
            if self.epoch:
                batches = [(x.flip(0), y.flip(0)) for x, y in batches]
            self.epoch += 1
            return iter(batches)

    with pytest.raises(fp.DataError, match="shuffle=False"):
        fp.score(_model(), Reshuffling(), samples_per_class=6, projections=32, progress=False,
                 max_memory="100kB")


class _Changing:
    """Gives the batches once as they are, then ``how`` they differ (fewer, or randomly augmented)."""

    def __init__(self, how):
        self.how, self.epoch = how, 0

    def __iter__(self):
        batches = _batches()
        if self.epoch and self.how == "fewer":
            batches = batches[:2]
        elif self.epoch and self.how == "augmented":  # the labels stay; the values do not
            batches = [(x + 0.01 * torch.randn_like(x), y) for x, y in batches]
        self.epoch += 1
        return iter(batches)


@pytest.mark.parametrize("how,match", [("fewer", "gave 2 batches where the first pass read"),
                                       ("augmented", "randomly augmented")])
def test_a_later_pass_must_read_the_very_batches_of_the_first(how, match):
    """Labels alone would pass an augmented loader, and a loader that ends early used to score silently."""
    with pytest.raises(fp.DataError, match=match):
        fp.score(_model(), _Changing(how), samples_per_class=6, projections=32, progress=False,
                 max_memory="100kB")


def test_a_shuffling_dataloader_is_refused_before_the_first_pass():
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    read = []
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True,
                                         collate_fn=lambda b: read.append(len(b)) or
                                         torch.utils.data.default_collate(b))
    with pytest.raises(fp.DataError, match="DataLoader shuffles.*shuffle=False"):
        fp.score(_model(), loader, samples_per_class=6, projections=32, progress=False, max_memory="100kB")
    assert len(read) <= 1  # the first batch (read to trace the model), not a whole pass


def test_the_room_to_compute_u_holds_the_grid_of_unequal_classes():
    """Classes of unequal size meet on a common quantile grid (up to the number of samples per unit): the
    smallest budget and the slices make room for one unit of it."""
    sizes = [SiteSize(units=64, width=32, raw_width=32)]
    equal = plan_passes(sizes, 320, 32, 1_600_000, layout=(320, 320))
    unequal = plan_passes(sizes, 275, 32, 1_600_000, layout=(320, 2440))
    assert max(hi - lo for p in unequal[0] for _, lo, hi in p) < max(hi - lo for p in equal[0] for _, lo, hi in p)
    with pytest.raises(fp.FairPrunerError, match="smallest budget that works is") as e:
        plan_passes(sizes, 275, 32, 1000, layout=(320, 2440))
    assert int(str(e.value).split("works is ")[1].split(" bytes")[0]) == 4 * (4 * 320 * 32 + 4 * 2440 * 32)


def test_plan_passes_stays_within_the_room_and_covers_every_unit():
    sizes = [SiteSize(64, 128, 16), SiteSize(10, 1, 0), SiteSize(300, 128, 256)]
    passes, raw = plan_passes(sizes, samples=50, projections=128, budget=4_000_000)
    assert raw == [True, False, False]
    per_unit = [4 * 50 * 16, 4 * 50 * 1, 4 * 50 * 128]
    stored = [sum((hi - lo) * per_unit[i] for i, lo, hi in p) for p in passes]
    assert len(passes) > 2 and max(stored) <= 3_000_000
    # The first pass, which also holds the backward's activations, stores the least.
    assert stored[0] == min(stored) < stored[1]
    covered = {i: [] for i in range(3)}
    for p in passes:
        for i, lo, hi in p:
            covered[i].append((lo, hi))
    for i, s in enumerate(sizes):
        spans = sorted(covered[i])
        assert spans[0][0] == 0 and spans[-1][1] == s.units
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # Pieces cut even a store that fits (torch.distributed's owners receive one slice at a time).
    one, _ = plan_passes(sizes, samples=50, projections=128, budget=10 ** 12, pieces=16)
    assert len(one) == 1 and len(one[0]) >= 16


def test_class_pair_search_is_a_close_lower_bound():
    g = torch.Generator().manual_seed(0)
    classes, per, units, proj = 60, 8, 40, 16
    centres = torch.randn(classes, units, proj, generator=g)
    data = centres.repeat_interleave(per, 0) + torch.randn(classes * per, units, proj, generator=g)
    labels = torch.arange(classes).repeat_interleave(per)
    exact = max_pairwise_w1(data, labels, pairs="all")
    found = max_pairwise_w1(data, labels, pairs="search")
    assert bool((found <= exact + 1e-5).all())
    assert float((found / exact).mean()) > 0.97
    assert torch.equal(max_pairwise_w1(data, labels, pairs="auto"), found)  # 60 classes > 32


def test_class_pairs_is_checked_and_recorded():
    with pytest.raises(fp.FairPrunerError, match="class_pairs"):
        fp.score(_model(), _batches(), class_pairs="some")
    s = fp.score(_model(), _batches(), samples_per_class=6, projections=8, progress=False, class_pairs="search")
    assert s.meta["u_store"]["class_pairs"] == "search"


def _one_pass_then_tight(model, between=lambda: None):
    """``model`` scored in one pass, ``between()`` called, then scored again under a third of that store."""
    loader = tiny_loader((3, 16, 16), classes=4, per=6, batch=8)
    free = fp.score(model, loader, projections=8)
    between()
    tight = fp.score(model, loader, projections=8, max_memory=free.meta["u_store"]["peak_bytes"] // 3)
    assert tight.meta["u_store"]["passes"] > 1
    return free, tight, len(loader)


def test_forward_only_passes_stop_at_their_last_site():
    """Later passes run no backward, so their forward ends once the pass's last site has its samples: the
    classifier, after every site, runs no more often under a tight budget than in one pass; scores equal."""
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append(1))
    one_pass = []
    free, tight, _ = _one_pass_then_tight(model, lambda: (one_pass.append(len(calls)), calls.clear()))
    assert len(calls) == one_pass[0]
    for a, b in zip(free.groups, tight.groups):
        assert torch.equal(a.u, b.u) and torch.equal(a.r, b.r), a.name
    # The budget changes nothing in the scores, so nothing in a plan's file either (it is not recorded there).
    assert fp.plan(free, macs=0.3).to_json() == fp.plan(tight, macs=0.3).to_json()


def test_forward_only_passes_keep_no_activations_for_a_backward():
    """Autograd saves nothing on later passes (no backward follows), so a pass holds its store, not a batch's
    activations beside it; the first pass, which runs the backward, saves them as usual."""
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    saved = []  # per forward of a calibration batch (8 samples; tracing runs 1 or 2): is its input held?

    def record(module, inputs, output):
        if output.shape[0] == 8:
            try:
                saved.append(torch.is_tensor(output.grad_fn._saved_input))
            except TypeError:  # the unpack hook gives nothing back: nothing was kept
                saved.append(False)

    model.conv1.register_forward_hook(record)
    first = []
    _, _, batches = _one_pass_then_tight(model, lambda: (first.extend(saved), saved.clear()))
    assert first and all(first)
    assert saved.count(True) >= batches and saved.count(False) >= batches


@pytest.mark.skipif(budget_module._LIBC is None, reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_small_blocks_back():
    """Batch-sized tensors freed among live ones stay resident until the heap is trimmed between passes."""
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    big = torch.ones(2 ** 22)  # freeing a 16 MB block raises glibc's memory-map threshold above 1 MB,
    del big  # as the activations of a real model do
    blocks, keep = [], []
    for _ in range(200):  # 1 MB blocks, now on the heap, each freed one between two live ones: they cannot
        blocks.append(torch.ones(2 ** 18))  # merge into a free top of the heap, which free() would trim itself
        keep.append(torch.ones(2 ** 18))
    del blocks
    freed = resident()
    budget_module.trim_heap()
    assert resident() < freed - 100 * 2 ** 20
    assert all(bool((t == 1).all()) for t in keep)
