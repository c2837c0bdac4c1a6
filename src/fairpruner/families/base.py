"""The extension point: a *unit family* is a kind of prunable unit that torch-pruning's dependency graph
cannot express (attention heads, recurrent hidden units, mixture-of-experts experts).

A :class:`Family` finds its own groups (:class:`~fairpruner._core.groups.GroupSpec` whose ``family`` is the
family instance), says where each group's U-Score is observed (:class:`USource`), which parameter slices
belong to each unit (the groups' members), what MACs scale with the units, and performs the surgery.
Scoring, planning, masking and the cost model stay generic: they only read members. Families are registered
by the :func:`register` decorator; :func:`build` makes the instances a scoring or pruning call hands to
the graph adapter and the cost model, each with its options (a small versioned :class:`FamilyOptions`
dataclass that scores and plans record, so a plan is applied with the options it was scored with).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import weakref
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .._core.groups import GroupSpec, MacsTerm, zero_members_
from .._core.inputs import first_sample
from .._errors import FairPrunerError

__all__ = ["Family", "FamilyOptions", "USource", "MacsTerm", "register", "unregister", "registered", "build",
           "options_record", "hook_source", "PerModel"]


@dataclasses.dataclass(frozen=True)
class FamilyOptions:
    """Base of a family's options: a frozen dataclass with a class-level ``version``, checked in
    ``__post_init__`` by subclasses and recorded with :meth:`to_dict` in scores and plans."""

    version: ClassVar[int] = 1

    def to_dict(self) -> Dict[str, Any]:
        return {"version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FamilyOptions":
        if int(d.get("version", 1)) > cls.version:
            raise FairPrunerError(f"{cls.__name__} version {d['version']} is newer than this fairpruner "
                                  f"understands ({cls.version}); upgrade.")
        return cls(**{k: v for k, v in d.items() if k != "version"})


@dataclasses.dataclass
class USource:
    """Where the per-unit outputs of a family group are observed during the scoring pass.

    Attributes:
        name: a stable label (seeds the random projections, names the site in errors).
        attach: ``attach(modules, emit) -> list of hook handles``; the hooks call ``emit(t)`` once per forward
            with ``t`` shaped ``(batch, channels, *features)`` in batch order (``channels`` = the group's root
            channels), e.g. ``(B, heads, T * head_dim)``.
    """

    name: str
    attach: Callable[[Dict[str, nn.Module], Callable[[torch.Tensor], None]], List[Any]]


class Family(abc.ABC):
    """Base class of a unit family: three required methods, the rest optional hooks.

    Subclasses set ``name`` (the registry key, also recorded in plans), optionally ``Options`` (a
    :class:`FamilyOptions` subclass; the instance's options are then ``self.options``), and implement
    :meth:`discover`, :meth:`u_sources` and :meth:`prune_`. The default :meth:`mask_` zeroes every member's
    parameter slices, so a family whose members list every parameter it cuts gets masking (and with it the
    pruned == masked check) for free.

    Example:
        A family whose unit is one output of a user's ``Gate`` block (``relu(fc(x)) * sigmoid(gate)``, a
        parameter torch-pruning cannot follow), read by the next Linear ``head``::

            from fairpruner import families
            from fairpruner.families import Family, GroupSpec, Member, hook_source

            @families.register
            class GateUnits(Family):
                name = "gate_units"

                def claims(self, module):        # its own parameter is ours to cut, not refused
                    return isinstance(module, Gate)

                def owned(self, model):          # torch-pruning must leave these layers alone
                    return [f"{n}{s}" for n, m in model.named_modules() if isinstance(m, Gate)
                            for s in ("", ".fc")]

                def discover(self, model, graph, example_inputs, ignore):
                    rows = torch.arange(model.block.fc.out_features).view(-1, 1)
                    members = [Member("block.fc", "out", rows, "weight"),
                               Member("block", "out", rows, "other", params=(("gate", 0),)),
                               Member("head", "in", rows, "weight")]
                    return [GroupSpec("block:units", len(rows), rows, members, family=self)]

                def u_sources(self, model, group):
                    return [hook_source(group.name, "block")]

                def prune_(self, model, group, channels):
                    keep = families.kept(model.block.fc.out_features, torch.tensor(channels))
                    families.slice_linear_(model.block.fc, 0, keep)
                    model.block.gate = nn.Parameter(model.block.gate.detach()[keep])
                    families.slice_linear_(model.head, 1, keep)

        ``tests/families/test_toy_family.py`` holds a complete, tested version.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[Optional[Type[FamilyOptions]]] = None

    def __init__(self, options: Optional[FamilyOptions] = None) -> None:
        if options is not None and (self.Options is None or not isinstance(options, self.Options)):
            raise FairPrunerError(f"Family '{self.name}' takes {self.Options.__name__ if self.Options else 'no'} "
                                  f"options, got {type(options).__name__}.")
        self.options = options if options is not None else (self.Options() if self.Options else None)

    # ------------------------------------------------------------------------------------------- required
    @abc.abstractmethod
    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        """This family's groups in ``model`` (``ignore``: module names the user or the output layer protect).
        Each group's ``family`` is ``self``."""

    @abc.abstractmethod
    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        """Where U is observed for ``group``."""

    @abc.abstractmethod
    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        """Removes root ``channels`` of ``group`` from ``model`` in place, keeping module attributes consistent."""

    # --------------------------------------------------------------------------------------- optional hooks
    def claims(self, module: nn.Module) -> bool:
        """True for modules this family makes acceptable to the layer check (e.g. ``nn.LSTM``)."""
        return False

    def tp_pruners(self) -> Dict[type, Any]:
        """``customized_pruners`` for torch-pruning's graph (module type -> pruner), if the family has any."""
        return {}

    def owned(self, model: nn.Module) -> List[str]:
        """Modules torch-pruning must not root or prune groups at, because this family handles them."""
        return []

    def tracing(self, model: nn.Module) -> Any:
        """A context manager entered while torch-pruning traces ``model`` (e.g. hooks that hide a layer's
        internal operations, which the library would misread, behind one node)."""
        return contextlib.nullcontext()

    def layout(self, module: nn.Module, side: str) -> Optional[Tuple[Tuple[str, int], ...]]:
        """Explicit ``(param, dim)`` pairs of a module this family claims when it is a member (``side``) of a
        torch-pruning group, e.g. an LSTM's input columns; None: laid out like Conv/Linear."""
        return None

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        """MACs outside Conv/Linear layers that shrink with ``group``'s units (attention products, recurrent
        matmuls). Their sum is taken out of the cost model's constant part."""
        return []

    def units_from_scores(self, group: GroupSpec, u: torch.Tensor, r: torch.Tensor) -> Optional[torch.Tensor]:
        """The group's units chosen from its per-root-channel U and R, as a ``(units, unit_size)`` tensor of root
        channels, for a family whose units the architecture does not fix (one hidden unit of every stacked
        expert, matched by rank, so that every expert keeps the same width); None keeps ``group.unit_channels``.
        The unit count and size must stay those of ``group``."""
        return None

    def finish_(self, model: nn.Module) -> None:
        """Model-wide bookkeeping once every group of this family that a plan cuts has been pruned (a count
        the whole model shares, such as its experts per block); by default nothing."""

    def mask_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        """Zeroes what :meth:`prune_` would remove, so that the masked model computes what the pruned one does.
        By default every member's parameter slices are zeroed; override where zero is not neutral (a router
        logit must become -inf, not 0)."""
        zero_members_(model, group, channels)


def rank_units(table: torch.Tensor, ranks: int = 1) -> torch.Tensor:
    """Units that take the same ranks from every part: ``table`` is ``(parts, width)`` root channels, each row in
    rank order; unit ``k`` holds ranks ``k * ranks ... (k + 1) * ranks - 1`` of every part, so the result is
    ``(width / ranks, parts * ranks)``. Removing units then leaves every part the same width."""
    parts, width = table.shape
    return table.view(parts, width // ranks, ranks).transpose(0, 1).reshape(width // ranks, -1).contiguous()


def units_by_rank(u: torch.Tensor, parts: int, ranks: int = 1) -> torch.Tensor:
    """:func:`rank_units` of root channels ``0 .. n-1`` split into ``parts`` equal consecutive parts, each part's
    channels ordered by ascending ``u`` (ties by index): unit 0 holds every part's lowest-U channels."""
    order = torch.argsort(u.detach().cpu().double().view(parts, -1), dim=1, stable=True)
    return rank_units(order + torch.arange(parts).unsqueeze(1) * order.shape[1], ranks)


_REGISTRY: Dict[str, Type[Family]] = {}


def register(cls: Type[Family]) -> Type[Family]:
    """Class decorator: adds a :class:`Family` subclass to the registry, keyed by its ``name``.

    Raises:
        FairPrunerError: if the class is not a Family, has no name, or another class holds the name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise FairPrunerError(f"register() takes a Family subclass, got {cls!r}.")
    if not cls.name:
        raise FairPrunerError(f"Family {cls.__qualname__} has no `name`; set a unique class attribute `name`.")
    held = _REGISTRY.get(cls.name)
    if held is not None and held is not cls:
        raise FairPrunerError(f"A unit family named '{cls.name}' is already registered ({held.__module__}."
                              f"{held.__qualname__}); give {cls.__qualname__} another name.")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Removes the family registered as ``name`` (a no-op if there is none)."""
    _REGISTRY.pop(name, None)


def registered() -> List[Type[Family]]:
    """The registered family classes, in registration order."""
    return list(_REGISTRY.values())


def _legacy(record: Mapping[str, Any]) -> Dict[str, Any]:
    """Files written before options were per family held ``{"attention": "heads" | "head_dims"}``."""
    units = record.get("attention")
    if not isinstance(units, str):
        return dict(record)
    rest = {k: v for k, v in record.items() if k != "attention"}
    for cls in registered():
        if cls.Options is not None and "units" in {f.name for f in dataclasses.fields(cls.Options)}:
            rest.setdefault(cls.name, {"version": 1, "units": units})
    return rest


def build(options: Optional[Mapping[str, Any]] = None) -> List[Family]:
    """One instance of every registered family, in registration order.

    Args:
        options: family name -> its :class:`FamilyOptions` (or the dict :meth:`FamilyOptions.to_dict` wrote,
            as scores and plans record them). Families not named get their default options.

    Raises:
        FairPrunerError: for options naming no registered family, or of the wrong type.
    """
    options = _legacy(options or {})
    unknown = sorted(set(options) - set(_REGISTRY))
    if unknown:
        raise FairPrunerError(f"Options for unknown unit families {unknown}; registered: {sorted(_REGISTRY)}.")
    out = []
    for cls in registered():
        opt = options.get(cls.name)
        if isinstance(opt, Mapping):
            if cls.Options is None:
                raise FairPrunerError(f"Family '{cls.name}' takes no options, got {dict(opt)}.")
            opt = cls.Options.from_dict(opt)
        out.append(cls(opt))
    return out


def options_record(families: Sequence[Family]) -> Dict[str, Dict[str, Any]]:
    """What scores and plans record: family name -> options dict, for the families that have options."""
    return {f.name: f.options.to_dict() for f in families if f.options is not None}


def hook_source(name: str, module: str, *, side: str = "output", item: Optional[int] = None,
                index: Optional[torch.Tensor] = None, channels_last: bool = True) -> USource:
    """A source reading one module's output (or input) tensor.

    Args:
        name: label of the source.
        module: qualified module name.
        side: "output" (forward hook) or "input" (pre-hook, first positional input).
        item: position in a tuple output (``nn.LSTM`` returns ``(output, (h, c))``).
        index: (channels, k) positions in the feature dimension of each root channel; None keeps all.
        channels_last: the feature dimension is the last one (``(B, T, D)`` tokens) rather than dimension 1.
    """
    def attach(modules: Dict[str, nn.Module], emit: Callable[[torch.Tensor], None]) -> List[Any]:
        def take(t: Any) -> None:
            if item is not None:
                t = t[item]
            x = t.movedim(-1, 1) if channels_last and t.dim() > 2 else t
            if index is not None:
                idx = index.to(x.device)
                x = x.index_select(1, idx.flatten())
                x = x.unflatten(1, tuple(idx.shape))  # (B, channels, k, *rest)
                x = x.movedim(2, -1).flatten(2) if x.dim() > 3 else x.flatten(2)
            emit(x)
        mod = modules[module]
        if side == "output":
            return [mod.register_forward_hook(lambda m, i, o: take(o))]
        return [mod.register_forward_pre_hook(lambda m, i: take(i[0]))]
    return USource(name, attach)


class PerModel:
    """A value computed once per model and example-input shapes, for every group of a family: e.g. the counts of
    one forward pass that all of a family's MACs terms read. ``compute(model, x)`` gets the first sample's
    arguments; the value is recomputed when the inputs' or the parameters' shapes change (a pruned model).

    Example:
        >>> self._counts = PerModel(lambda model, x: attention_macs(model, x, functional=names(model)))
        >>> macs = self._counts(model, example_inputs)[name]
    """

    def __init__(self, compute: Callable[[nn.Module, tuple], Any]) -> None:
        self.compute = compute
        self._cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module, example_inputs: tuple) -> Any:
        x = first_sample(example_inputs)
        key = (tuple((tuple(t.shape), t.dtype) if torch.is_tensor(t) else repr(t) for t in x),
               tuple(tuple(p.shape) for p in model.parameters()))
        cached = self._cache.get(model)
        if cached is None or cached[0] != key:
            cached = (key, self.compute(model, x))
            self._cache[model] = cached
        return cached[1]
