"""Strategy configs: one frozen dataclass per strategy, its options as typed, validated fields.

torchao's ``AOBaseConfig`` is the model: a strategy's options are a frozen dataclass
(:class:`StrategyConfig` subclassed), registered with the strategy class under its name
(:func:`~slao_kernels.continual.strategies.register_strategy`). A field's declared type
says what it accepts (``float``, ``int | None``, ``Literal["global", "module"]``, unions
of those); :func:`option` adds a range check and the words that describe it. A config is
checked when it is built: a value of another type raises ``TypeError``, one out of range
``ValueError``, each naming the field, what it accepts and what was given.

Text (a command line, a benchmark spec) becomes a value by the field's declared type,
never by guessing from the text: :meth:`StrategyConfig.parse_option`.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal


def option(default, *, accepts: str | None = None, check: Callable[[Any], bool] | None = None,
           report: bool = True):
    """A config field with a default.

    Args:
        default: the value when the option is not given.
        accepts: what the option accepts, in words, for error messages (default: its
            declared type described, e.g. "an integer or none").
        check: a predicate on a value of the declared type (a range), or None.
        report: whether the run's report lists it under ``strategy_config``.
    """
    return field(default=default, metadata={"accepts": accepts, "check": check, "report": report})


def describe_type(tp) -> str:
    """A declared option type in words: ``int | None`` → "an integer or none"."""
    if tp is type(None):
        return "none"
    if typing.get_origin(tp) is Literal:
        values = ", ".join(repr(v) for v in typing.get_args(tp))
        return f"one of {values}" if len(typing.get_args(tp)) > 1 else values
    if _is_union(tp):
        return " or ".join(describe_type(t) for t in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _conform(tp, value) -> tuple[bool, Any]:
    """``(True, value)`` normalized (an int given for a float is made a float) when ``value`` is of
    the declared type ``tp``; ``(False, value)`` otherwise. bool is not taken for an int or a float."""
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if typing.get_origin(tp) is Literal:
        return any(type(value) is type(v) and value == v for v in typing.get_args(tp)), value
    if _is_union(tp):
        for member in typing.get_args(tp):
            ok, normalized = _conform(member, value)
            if ok:
                return True, normalized
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if tp is float and isinstance(value, (int, float)):
        return True, float(value)
    return isinstance(value, tp), value


def _value_types(tp) -> set:
    """The Python types of the values ``tp`` declares (a Literal: those of its values)."""
    if typing.get_origin(tp) is Literal:
        return {type(v) for v in typing.get_args(tp)}
    if _is_union(tp):
        return set().union(*(_value_types(t) for t in typing.get_args(tp)))
    return {int, float} if tp is float else {tp}


def _from_text(tp, text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` spells a value of the declared type ``tp`` (the members of a
    union tried in order), else ``(False, None)``."""
    if tp is type(None):
        return text.lower() == "none", None
    if typing.get_origin(tp) is Literal:
        matches = [v for v in typing.get_args(tp) if isinstance(v, str) and v == text]
        return bool(matches), text if matches else None
    if _is_union(tp):
        for member in typing.get_args(tp):
            ok, value = _from_text(member, text)
            if ok:
                return True, value
        return False, None
    if tp is bool:
        return text.lower() in ("true", "false"), text.lower() == "true"
    if tp is str or tp is Any:
        return True, text
    if tp in (int, float):
        try:
            return True, tp(text)
        except ValueError:
            return False, None
    return False, None


@dataclass(frozen=True)
class StrategyConfig:
    """Base of every strategy's options; a strategy without options registers an empty subclass.

    Subclasses are frozen dataclasses whose fields all have defaults (:func:`option` for a
    range check). Building one checks every field (``TypeError``/``ValueError`` naming it).
    """

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, self._checked(f.name, getattr(self, f.name)))

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """The options and their declared types, in field order."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    @classmethod
    def option_names(cls) -> list[str]:
        """The option names, in field order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def default(cls, name: str):
        """Option ``name``'s default value."""
        f = cls._field(name)
        return f.default if f.default is not MISSING else f.default_factory()

    @classmethod
    def accepts(cls, name: str) -> str:
        """What option ``name`` accepts, in words (e.g. "a number in [0, 1]")."""
        return cls._field(name).metadata.get("accepts") or describe_type(cls.option_types()[name])

    @classmethod
    def parse_option(cls, name: str, text: str):
        """Option ``name`` from text, by its declared type (``int | None``: "none" or an integer;
        a ``Literal``: one of its strings exactly; bool: true/false), range-checked.

        Raises:
            ValueError: ``name`` is not an option (naming the options), or the text is not a
                value it accepts ("<name> must be <what it accepts>, got '<text>'").
        """
        cls._field(name)
        ok, value = _from_text(cls.option_types()[name], text)
        check = cls._field(name).metadata.get("check")
        if not ok or (check is not None and not check(value)):
            raise ValueError(f"{name} must be {cls.accepts(name)}, got {text!r}")
        return value

    @classmethod
    def from_options(cls, options: dict, where: str = "") -> StrategyConfig:
        """Build from keyword options; unknown names raise ``ValueError`` listing the options."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"{where or cls.__name__} has no option(s) {unknown}; its options: {cls.option_names()}")
        return cls(**options)

    def report(self) -> dict:
        """The options as the run's report lists them (``strategy_config``): JSON values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("report", True)}

    @classmethod
    def _field(cls, name: str):
        for f in fields(cls):
            if f.name == name:
                return f
        raise ValueError(f"{cls.__name__} has no option {name!r}; its options: {cls.option_names()}")

    @classmethod
    def _checked(cls, name: str, value):
        ok, value = _conform(cls.option_types()[name], value)
        if not ok and type(value) in _value_types(cls.option_types()[name]):  # the type, not one of its values
            raise ValueError(f"{cls.__name__}.{name} must be {cls.accepts(name)}, got {value!r}")
        if not ok:
            raise TypeError(f"{cls.__name__}.{name} must be {cls.accepts(name)}, got {value!r} "
                            f"({type(value).__name__})")
        check = cls._field(name).metadata.get("check")
        if check is not None and not check(value):
            raise ValueError(f"{cls.__name__}.{name} must be {cls.accepts(name)}, got {value!r}")
        return value


def _finite(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[float], bool]:
    """A range predicate on numbers (NaN is outside every range)."""
    return lambda v: (low < v if low_open else low <= v) and v <= high and not math.isnan(v)


@dataclass(frozen=True)
class SLAOConfig(StrategyConfig):
    """SLAO's options (:class:`~slao_kernels.SLAO`): the merge schedule ``lam``, the init of task
    i ≥ 2 and the merged factor; the ablations of the paper."""

    lam: Literal["inv_sqrt", "inv"] | float = option(
        "inv_sqrt", accepts="inv_sqrt, inv or a number in (0, 1]",
        check=lambda v: isinstance(v, str) or _finite(0.0, 1.0, low_open=True)(v))
    init: Literal["orthogonal", "last_ft", "last_merge", "random"] = "orthogonal"
    merge: Literal["B", "A", "AB", "none"] = "B"


@dataclass(frozen=True)
class SeqLoRAConfig(StrategyConfig):
    """SeqLoRA has no options."""


@dataclass(frozen=True)
class IncLoRAConfig(StrategyConfig):
    """IncLoRA has no options."""


@dataclass(frozen=True)
class OLoRAConfig(StrategyConfig):
    """O-LoRA's option: the weight of the orthogonality penalty."""

    weight: float = option(0.5, accepts="a number >= 0", check=_finite(0.0))


@dataclass(frozen=True)
class MultiTaskConfig(StrategyConfig):
    """MultiTask has no options."""


@dataclass(frozen=True)
class GradientInitConfig(StrategyConfig):
    """The options of the gradient-based inits: batches per gradient, the memory cap of the
    full-weight gradients (None: all layers at once), the seed of the randomized SVD and of
    the batches (not in the report)."""

    grad_batches: int = option(4, accepts="an integer >= 1", check=lambda v: v >= 1)
    max_gradient_bytes: int | None = option(None, accepts="an integer >= 1 or none",
                                            check=lambda v: v is None or v >= 1)
    seed: int = option(0, report=False)


@dataclass(frozen=True)
class LoRAGAConfig(GradientInitConfig):
    """LoRA-GA's options: those of every gradient init and ``gamma`` of the stable scale."""

    gamma: float = option(16.0, accepts="a number > 0", check=_finite(0.0, low_open=True))


@dataclass(frozen=True)
class SLICEConfig(GradientInitConfig):
    """SLICE's options: those of every gradient init, the PCGrad strength ``c``, its ``scope``
    and the replay rows kept of every finished task."""

    c: float = option(1.0, accepts="a number in [0, 1]", check=_finite(0.0, 1.0))
    scope: Literal["global", "module"] = "global"
    buffer_per_task: int = option(32, accepts="an integer >= 0", check=lambda v: v >= 0)
