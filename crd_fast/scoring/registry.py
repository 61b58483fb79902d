"""The registry of scoring models: a name (what the model file's ``spatial_choice`` and ``--spatial`` say) -> a class.

Torch-free, so the command line and ``DetectorConfig`` can list and check the names without importing torch: the
built-in models are named here with the module that defines them and imported on first use; any other model
registers itself with the :func:`register` decorator when its module is imported (docs/DESIGN.md "A new scoring
model").
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

#: The value of the ``spatial`` option that chooses among the selectable models without labels.
AUTO = "auto"

# name -> ("module:Class", selectable): the built-in models, simplest first (the label-free choice prefers the
# earlier of two models that describe held-out patches equally well).
_BUILTIN: dict[str, tuple[str, bool]] = {
    "global": ("crd_fast.scoring.global_crd:GlobalCRD", True),
    "local": ("crd_fast.scoring.local_crd:LocalCRD", True),
}
_REGISTERED: dict[str, Any] = {}

T = TypeVar("T")


def register(cls: T) -> T:
    """Class decorator: make scoring model ``cls`` (a ``ScoringModel`` subclass) available under ``cls.name``.

    A built-in name or one already taken by another class is refused; registering the same class again is a
    no-op (its module may be imported twice under two names).
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"a scoring model needs a class attribute 'name' (not {AUTO!r}), got {name!r}")
    if name in _BUILTIN and _BUILTIN[name][0] != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"scoring model name {name!r} is a built-in model's")
    known = _REGISTERED.get(name)
    if known is not None and known is not cls and known.__qualname__ != getattr(cls, "__qualname__", None):
        raise ValueError(f"scoring model name {name!r} is already taken by {known.__module__}.{known.__qualname__}")
    _REGISTERED[name] = cls
    return cls


def model_names() -> tuple[str, ...]:
    """Every scoring model's name: the built-in ones first, then those registered, in registration order."""
    return tuple(_BUILTIN) + tuple(n for n in _REGISTERED if n not in _BUILTIN)


def spatial_modes() -> tuple[str, ...]:
    """The values of the detector's ``spatial`` option: every model's name, and "auto"."""
    return model_names() + (AUTO,)


def selectable_names() -> tuple[str, ...]:
    """The models "auto" chooses among (those that take part in the label-free choice), simplest first."""
    out = [n for n, (_, selectable) in _BUILTIN.items() if selectable]
    out += [n for n, cls in _REGISTERED.items() if n not in _BUILTIN and getattr(cls, "selectable", False)]
    return tuple(out)


def model_class(name: str) -> Any:
    """The class registered under ``name`` (imported on first use); ValueError naming the known models."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown scoring model {name!r}; known: {', '.join(model_names())}")
    module_name, class_name = _BUILTIN[name][0].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    _REGISTERED[name] = cls
    return cls


def check_spatial(option: str, value: Any) -> str:
    """``value`` if it is a model name or "auto", else ValueError (the ``spatial`` option's validator)."""
    modes = spatial_modes()
    if not isinstance(value, str) or value not in modes:
        raise ValueError(f"{option} must be one of {modes}, got {value!r}")
    return value


__all__: list[str] = [
    "AUTO",
    "check_spatial",
    "model_class",
    "model_names",
    "register",
    "selectable_names",
    "spatial_modes",
]
