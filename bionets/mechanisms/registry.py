"""The registry of mechanisms: each turns its typed config section into a model change plus hooks.

A mechanism module registers itself with::

    @register_mechanism("arr", ArrConfig, order=90)
    def apply_arr(model: nn.Module, cfg: ArrConfig) -> Applied: ...

``apply`` must work on any timm or torchvision model it is eligible for, raise
:class:`bionets.errors.BionetsError` (one line) where it is not, and be idempotent: applying it to
a model it was already applied to changes nothing more. ``order`` fixes the composition order
(structure changes first, reparameterizations after, pure hooks last).
The config's ``mechanisms:`` section maps names to sections, e.g.
``mechanisms: {raa: {}, arr: {weight: 10}}``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from bionets.configbase import Section
from bionets.engine.hooks import Hook
from bionets.engine.optim import sgd_like
from bionets.errors import BionetsError, unknown


class SgdRateNote(str):
    """A note on training that holds only under an SGD-like optimizer, and only where ``optim.lr_mult``
    does not set its ``patterns`` already: a run's start-up leaves it out otherwise
    (:meth:`Report.for_optimizer`); a report printed outside a run keeps it."""

    patterns: tuple[str, ...]

    def __new__(cls, text: str, patterns: tuple[str, ...]):
        note = super().__new__(cls, text)
        note.patterns = tuple(patterns)
        return note

    def holds_for(self, optimizer: str, lr_mult: dict) -> bool:
        return sgd_like(optimizer) and not set(self.patterns) <= set(lr_mult)


class OptimizerNote(str):
    """A note that asks for ``optimizer`` (optim.name): a run's start-up leaves it out where the run
    trains with it (bionets train requires it); a report printed outside a run keeps it."""

    optimizer: str

    def __new__(cls, text: str, optimizer: str):
        note = super().__new__(cls, text)
        note.optimizer = optimizer
        return note

    def holds_for(self, optimizer: str, lr_mult: dict) -> bool:
        return optimizer.lower() != self.optimizer


@dataclass
class Report:
    """What one mechanism changed in a model: a line per change, the parameters it added, and notes
    on training it (printed after the changes)."""

    mechanism: str
    changes: list[str] = field(default_factory=list)
    params_added: int = 0
    notes: list[str] = field(default_factory=list)

    def for_optimizer(self, optimizer: str, lr_mult: dict) -> Report:
        """This report without the notes that do not hold for a run with ``optimizer`` (optim.name)
        and ``lr_mult`` (:class:`SgdRateNote`, :class:`OptimizerNote`)."""
        return replace(self, notes=[n for n in self.notes if not isinstance(n, SgdRateNote | OptimizerNote)
                                    or n.holds_for(optimizer, lr_mult)])

    def __str__(self) -> str:
        head = f"{self.mechanism}: {len(self.changes)} change(s), +{self.params_added:,} parameters"
        return "\n".join([head] + [f"  {c}" for c in self.changes] + [f"  note: {n}" for n in self.notes])


@dataclass
class Applied:
    model: nn.Module
    hooks: list[Hook]
    report: Report


@dataclass(frozen=True)
class Mechanism:
    name: str
    config: type[Section]
    apply: Callable[[nn.Module, Section], Applied]
    order: int
    optimizer: str | None = None        # the optimizer (optim.name) the mechanism trains with, if it needs its own
    # optim.lr_mult entries a run under an SGD-like optimizer takes unless its config sets those patterns
    sgd_lr_mult: Callable[[Section], dict[str, float]] | None = None
    # whether 'bionets export' leaves the plain model free of it (its weights baked, its training-only state
    # dropped): a model exported with one that does not needs it applied again to load the file
    leaves_plain: bool = False
    # parameter names the mechanism used before, by suffix: {former: current}; an optim.lr_mult pattern
    # ending in a former one is refused with the current one named (it would match nothing)
    renamed: dict[str, str] = field(default_factory=dict)


MECHANISMS: dict[str, Mechanism] = {}


def register_mechanism(name: str, config: type[Section], order: int = 50, optimizer: str | None = None,
                       sgd_lr_mult: Callable[[Section], dict[str, float]] | None = None, leaves_plain: bool = False,
                       renamed: dict[str, str] | None = None):
    def wrap(fn: Callable[[nn.Module, Section], Applied]):
        MECHANISMS[name] = Mechanism(name, config, fn, order, optimizer, sgd_lr_mult, leaves_plain, renamed or {})
        return fn
    return wrap


def get_mechanism(name: str) -> Mechanism:
    load_builtin()
    if name not in MECHANISMS:
        raise unknown("mechanism", name, MECHANISMS)
    return MECHANISMS[name]


def parse_mechanisms(section: dict) -> dict[str, Section]:
    """Validate a raw ``mechanisms:`` mapping into typed sections (errors name the bad key).

    ``name: {}``, ``name: true`` or ``name: null`` applies a mechanism with its defaults; ``name:
    false`` removes one that a ``base:`` config applied (``mechanisms.raa=false`` on the command line)."""
    from bionets.config import validate_section  # late: config imports this module

    if not isinstance(section, dict):
        raise BionetsError(f"'mechanisms' must be a mapping of mechanism name to options, got {section!r}")
    return {name: validate_section(get_mechanism(name).config, {} if opts is None or opts is True else opts,
                                   f"mechanisms.{name}")
            for name, opts in section.items() if opts is not False}


def apply_mechanisms(model: nn.Module, sections: dict[str, Section]) -> tuple[nn.Module, list[Hook], list[Report]]:
    """Apply every configured mechanism in registry order; return the model, hooks and reports. The
    modules the mechanisms add take the model's mode (train or eval), as its own have it."""
    if sections and (lazy := next((n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)), None)):
        raise BionetsError(f"the model's parameter '{lazy}' is lazy (not yet made: a Lazy* layer): run one forward "
                           "pass on an example input first, which makes it, then apply the mechanisms")
    hooks: list[Hook] = []
    reports: list[Report] = []
    had = set(model.modules())                 # (the modules themselves: a freed one's id may be reused)
    for name in sorted(sections, key=lambda n: get_mechanism(n).order):
        applied = get_mechanism(name).apply(model, sections[name])
        model = applied.model
        hooks += applied.hooks
        reports.append(applied.report)
    for m in model.modules():
        if m not in had:
            m.training = model.training
    return model, hooks, reports


def load_builtin() -> None:
    """Import the built-in mechanism modules so that they register themselves."""
    import importlib
    import pkgutil

    import bionets.mechanisms as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry":
            importlib.import_module(f"bionets.mechanisms.{info.name}")
