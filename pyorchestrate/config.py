"""Nested ``Config`` classes and their validation.

A Config holds class-level defaults that subclasses override, accepts keyword overrides at
construction (unknown keywords become user-defined attributes), and validates itself with
:meth:`BaseConfig.validate`, which returns a list of :class:`ValidationResult`.
"""

from __future__ import annotations

import difflib
import functools
import enum
from dataclasses import dataclass
from typing import Any


class ValidationSeverity(enum.Enum):
    """How serious a validation finding is."""

    WARNING = "warning"  #: logged; the component still starts
    ERROR = "error"  #: the component does not start (unless the policy ignores errors)
    CRITICAL = "critical"  #: never ignorable


@dataclass(frozen=True)
class ValidationResult:
    """One finding of :meth:`BaseConfig.validate`."""

    field: str
    message: str
    severity: ValidationSeverity = ValidationSeverity.ERROR

    def __str__(self) -> str:
        return f"{self.severity.name} {self.field}: {self.message}"


@dataclass(frozen=True)
class ValidationPolicy:
    """Which findings may be ignored.  CRITICAL findings never are."""

    ignore_warnings: bool = False
    ignore_errors: bool = False


class ConfigValidationError(ValueError):
    """A Config failed validation; ``results`` lists every finding."""

    def __init__(self, owner: str, results: list[ValidationResult]) -> None:
        self.results = results
        lines = "\n".join(f"  - {r}" for r in results)
        super().__init__(f"invalid configuration for {owner}:\n{lines}")


@functools.lru_cache(maxsize=1024)
def _builtin_names(cls: type) -> frozenset[str]:
    """What :meth:`BaseConfig.builtin_names` returns, walked once per class (every
    register_agent validates: the walk was a quarter of registering an agent).  Settings added to
    a class after its first use are not seen (define them in the class body)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        names.update(k for k, v in vars(klass).items() if not k.startswith("_") and not callable(v)
                     and not isinstance(v, (classmethod, staticmethod, property)))
    return frozenset(names)


@functools.lru_cache(maxsize=1024)
def _class_typos(cls: type) -> tuple[ValidationResult, ...]:
    """Settings a user's Config subclass defines whose names are near misses of ours
    (``execution_intervall``): typos that would otherwise be silently ignored.  A class's
    attributes are its own settings too (``sensor = "t1"``): only near misses are said.  Once per
    class (cached: register_agent is on the launch path)."""
    ours: set[str] = set()
    for klass in cls.__mro__:
        if klass is not object and klass.__module__.startswith("pyorchestrate"):
            ours.update(k for k, v in vars(klass).items() if not k.startswith("_") and not callable(v)
                        and not isinstance(v, (classmethod, staticmethod, property)))
    found = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("pyorchestrate"):
            continue
        for key, value in vars(klass).items():
            if key.startswith("_") or key in ours or callable(value):
                continue
            close = difflib.get_close_matches(key, ours, n=1, cutoff=0.85)
            if close:
                found.append(ValidationResult(
                    key, f"{klass.__qualname__} defines {key!r}, not a setting of ours; did you mean "
                         f"{close[0]!r}? (kept as a user-defined attribute)", ValidationSeverity.WARNING))
    return tuple(found)


class BaseConfig:
    """Base of every nested ``Config``.

    Define defaults as class attributes; subclass to override them; pass keyword arguments to
    override per instance.  Override :meth:`validate` (calling ``super().validate()``) to add
    checks.
    """

    validation_policy: ValidationPolicy = ValidationPolicy()

    def __init__(self, **overrides: Any) -> None:
        for key, value in overrides.items():
            setattr(self, key, value)

    @classmethod
    def builtin_names(cls) -> set[str]:
        """Every attribute name defined by the class and its ancestors."""
        return set(_builtin_names(cls))

    def as_dict(self) -> dict[str, Any]:
        """Every setting (defaults and overrides) as a plain dict."""
        return {name: getattr(self, name) for name in sorted(self.builtin_names() | set(vars(self)))}

    def overrides(self) -> dict[str, Any]:
        """Only the values set on this instance."""
        return dict(vars(self))

    def validate(self) -> list[ValidationResult]:
        """Return the findings for this configuration.  Extend with ``super().validate()``."""
        results = []
        known = _builtin_names(type(self))
        for key in vars(self):
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
            if close:
                results.append(ValidationResult(
                    key, f"unknown setting; did you mean {close[0]!r}? (kept as a user-defined attribute)",
                    ValidationSeverity.WARNING))
        results.extend(r for r in _class_typos(type(self)) if r.field not in vars(self))
        return results

    def check(self, owner: str) -> list[ValidationResult]:
        """Validate and apply the policy: raise :class:`ConfigValidationError` for what may not be
        ignored; return the findings that were let through (to be logged)."""
        results = self.validate()
        policy = self.validation_policy
        blocking = [
            r for r in results
            if r.severity is ValidationSeverity.CRITICAL
            or (r.severity is ValidationSeverity.ERROR and not policy.ignore_errors)
        ]
        if blocking:
            raise ConfigValidationError(owner, results)
        if policy.ignore_warnings:
            results = [r for r in results if r.severity is not ValidationSeverity.WARNING]
        return results

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.overrides().items())
        return f"{type(self).__qualname__}({inner})"


def config_missing(wanted: type, config: BaseConfig) -> list[str]:
    """The settings of Config class ``wanted`` that ``config`` (of another class) has not."""
    return sorted(_builtin_names(wanted) - _builtin_names(type(config)) - set(vars(config)))


@functools.lru_cache(maxsize=1024)  # asked for every agent registered and every agent run on a worker
def checks_are_ours(config_class: type) -> bool:
    """Are a Config class's checks all pyorchestrate's (so they read nothing but its settings, and
    give the same answer wherever they run)?  A user's own validate() may look at anything (a
    file, the time): theirs runs for every agent, on the coordinator and again where it runs."""
    return config_class.check is BaseConfig.check and config_class.validate.__module__.startswith("pyorchestrate.")
