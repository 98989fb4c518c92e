"""Add LoRA adapters to a Hugging Face Llama-family model, and take them out again.

``patch_llama(model, config, filter_fn)`` follows torchao's ``quantize_``: in
place, idempotent, configured by a dataclass, optionally filtered per module.
Any model whose decoder layers name their projections the Llama way
(``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``: Llama, Mistral,
Qwen2, SmolLM) works; targets are matched on the last component of the module
path, so ``targets=("q_proj",)`` adapts every layer's ``self_attn.q_proj``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from slao_kernels._checks import (
    FLOAT_DTYPES,
    check_adapter_dtype,
    check_alpha,
    check_config_rank,
    check_dropout,
    check_rslora,
    check_scaling,
    lora_scaling,
)
from slao_kernels.nn import LoRALinear, default_lora_dtype
from slao_kernels.quantized import QuantizedBaseError, QuantizedLoRALinear, is_quantized_linear

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_REQUIRES_GRAD = "_slao_requires_grad"  # model attribute: parameter name -> requires_grad before patching


_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in FLOAT_DTYPES}


@dataclass(frozen=True)
class LoRAConfig:
    """Shape of the adapters :func:`patch_llama` adds.

    Every field is checked at construction (``TypeError`` for a wrong type, ``ValueError`` for a
    value out of range, the message naming the field), not at the first forward.

    Attributes:
        rank: adapter rank r, an int ≥ 1 (and ≤ min(in, out) of every target, checked by
            :func:`patch_llama`).
        alpha: LoRA alpha, a finite real number; scaling = alpha / r, or alpha / √r with ``rslora``.
            The scaling must be representable in ``dtype`` (in float32 when ``dtype`` is None) and
            in the base weights' dtype (checked by :func:`patch_llama` before it changes anything).
        targets: last path component of the linears to adapt (a str or a sequence of str).
        dropout: dropout on the adapter input, a real number in [0, 1).
        rslora: rank-stabilized scaling, a bool.
        dtype: adapter dtype (float32, bfloat16, float16, float64); None keeps fp32 adapters on
            16-bit models and the model's dtype otherwise.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    dtype: torch.dtype | None = None

    def __post_init__(self):
        rank = check_config_rank(self.rank, "LoRAConfig.rank")
        alpha = check_alpha(self.alpha, "LoRAConfig.alpha")
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, (tuple, list)):
            raise TypeError(f"LoRAConfig.targets must be a str or a tuple/list of str, got {targets!r} "
                            f"({type(targets).__name__})")
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoRAConfig.targets must be non-empty module names, got {targets!r}")
        dropout = check_dropout(self.dropout, "LoRAConfig.dropout")
        rslora = check_rslora(self.rslora, "LoRAConfig.rslora")
        check_adapter_dtype(self.dtype, "LoRAConfig.dtype")
        # The base dtype is unknown here: check against the adapter dtype when given, else float32 (the
        # narrowest dtype an adapter gets by default; a float64 adapter with a larger scaling needs
        # dtype=torch.float64). patch_llama checks each base weight's dtype too.
        check_scaling(lora_scaling(alpha, rank, rslora), (self.dtype or torch.float32,),
                      f"LoRAConfig: scaling = alpha/{'√' if rslora else ''}rank")
        for name, value in (("rank", rank), ("alpha", alpha), ("targets", targets), ("dropout", dropout),
                            ("rslora", rslora)):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """A JSON-safe dict of the fields: ``dtype`` as a name (``"float32"``) or None, ``targets`` a list.
        :meth:`from_dict` reads it back to an equal config."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout,
                "rslora": self.rslora, "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_dict(cls, d) -> LoRAConfig:
        """The config a :meth:`to_dict` dict (e.g. read from JSON) describes; missing keys take the defaults.

        Raises:
            ValueError: ``d`` is not a dict, has a key that is not a field, or a field has a wrong type
                or value (``targets`` must be a list or tuple of str, ``dtype`` None or a name such as
                ``"bfloat16"``); the message names the key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"LoRAConfig.from_dict needs a dict, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"LoRAConfig.from_dict: unknown key(s) {unknown}; the fields are {known}")
        kwargs = dict(d)
        if "targets" in kwargs and not isinstance(kwargs["targets"], (list, tuple)):
            raise ValueError(f"LoRAConfig.targets must be a list of str, got {kwargs['targets']!r}")
        if kwargs.get("dtype") is not None:
            name = kwargs["dtype"]
            if not isinstance(name, str) or name.replace("torch.", "", 1) not in _DTYPE_NAMES:
                raise ValueError(f"LoRAConfig.dtype must be None or one of {sorted(_DTYPE_NAMES)}, got {name!r}")
            kwargs["dtype"] = _DTYPE_NAMES[name.replace("torch.", "", 1)]
        try:
            return cls(**kwargs)
        except TypeError as e:  # malformed data is a bad value of the dict: one error type for readers
            raise ValueError(str(e)) from e

    def differences(self, module: LoRALinear) -> list[tuple[str, object, object]]:
        """``(field, existing, requested)`` for every field in which ``module``'s adapter differs from
        the one this config would add (``dtype=None`` requests the default for the module's base dtype)."""
        requested_dtype = self.dtype or (torch.float32 if isinstance(module, QuantizedLoRALinear)
                                         else default_lora_dtype(module.weight.dtype))
        existing_dropout = module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0
        pairs = [("rank", module.rank, self.rank), ("alpha", module.alpha, self.alpha),
                 ("dropout", existing_dropout, self.dropout), ("rslora", module.rslora, self.rslora),
                 ("dtype", module.lora_A.dtype, requested_dtype)]
        return [(f, old, new) for f, old, new in pairs if old != new]

    def same_adapter(self, module: LoRALinear) -> bool:
        """Whether ``module`` already carries the adapter this config would add (see :meth:`differences`)."""
        return not self.differences(module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _rng_states(devices) -> tuple:
    """The generators a LoRALinear's initialization draws from (CPU, and each CUDA device used)."""
    cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return torch.get_rng_state(), cuda


def _restore_rng_states(states) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for d, s in cuda.items():
        torch.cuda.set_rng_state(s, d)


def patch_llama(model: nn.Module, config: LoRAConfig | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :class:`LoRALinear`, in place.

    Afterwards only the adapters train: every other parameter is frozen (the
    previous ``requires_grad`` flags are remembered for :func:`revert`).

    A bitsandbytes ``Linear4bit`` (NF4/FP4) or ``Linear8bitLt`` target gets a
    :class:`~slao_kernels.quantized.QuantizedLoRALinear`: its base stays quantized in memory and is
    dequantized one layer per call (docs/design.md §2.4).

    All or nothing: every matched module is checked first (rank against its in/out features,
    its weight's dtype, the scaling in its dtype, that it can be wrapped), then every new
    :class:`LoRALinear` is built, and only then are they installed. On any error the model is
    exactly as before: the same module objects, parameters and ``requires_grad`` flags, no new
    attribute (and the random generators as before).

    Args:
        model: a Hugging Face Llama-family model (any dtype or device).
        config: adapter shape and targets; default ``LoRAConfig()``.
        filter_fn: ``filter_fn(module, path) -> bool`` to adapt only some of the
            targeted linears (e.g. only some layers).

    Returns:
        The paths of all adapted modules, sorted. Patching again with the same
        config changes nothing (and warns so); if any field (rank, alpha, dropout,
        rslora, dtype) differs from an existing adapter's, it raises.

    Raises:
        TypeError: ``config`` is not a :class:`LoRAConfig`, or a target's weight has a dtype the
            kernels do not take.
        ValueError: a target name matches no ``nn.Linear`` of the model, nothing
            would be adapted, a rank does not fit a layer, the scaling overflows a
            layer's dtype, a targeted module already has a different adapter (the
            message names the fields, existing and requested values), or a targeted
            linear is reachable under two paths.
    """
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    # --- 1. find and check every target; nothing is changed in this phase
    found = {t: 0 for t in config.targets}
    new, existing, conflicts = [], [], []
    paths = {}  # id(linear) -> its paths: a module reachable twice cannot be swapped at one path only
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in found:
            paths.setdefault(id(module), []).append(name)
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf not in found or not isinstance(module, (nn.Linear, LoRALinear)):
            continue
        found[leaf] += 1
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if isinstance(module, LoRALinear):
            diff = config.differences(module)
            if diff:
                conflicts.append((name, diff))
            existing.append(name)
        else:
            if len(paths.get(id(module), ())) > 1:
                raise ValueError(f"patch_llama: the nn.Linear at {name} is also reachable as "
                                 f"{[p for p in paths[id(module)] if p != name]}; a shared module cannot be adapted")
            cls = QuantizedLoRALinear if is_quantized_linear(module) else LoRALinear
            cls.check_args(module, config.rank, config.alpha, config.dropout, config.rslora, config.dtype, where=name)
            new.append((name, module))
    if conflicts:
        name, diff = conflicts[0]
        fields_text = ", ".join(f"{f} (existing {old!r}, requested {req!r})" for f, old, req in diff)
        more = f" (and {len(conflicts) - 1} more module(s))" if len(conflicts) > 1 else ""
        raise ValueError(f"{name}{more} already has an adapter that differs from the requested config in "
                         f"{fields_text}; revert(model) first")
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                          if isinstance(m, (nn.Linear, LoRALinear))})
        raise ValueError(f"target(s) {missing} match no nn.Linear in {type(model).__name__}; "
                         f"its linear modules are named {linears}")
    if not new and not existing:
        raise ValueError(f"patch_llama adapted no module: filter_fn rejected every one of {list(config.targets)}")
    if not new:
        warnings.warn(f"patch_llama: all {len(existing)} targeted modules already carry this adapter; "
                      "nothing changed", stacklevel=2)
        return sorted(existing)

    # --- 2. build every adapter, then 3. install them; undo everything on any error
    flags = [(p, p.requires_grad) for p in model.parameters()]
    old_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = _rng_states({linear.weight.device for _, linear in new})
    owned = [(linear, linear.weight, linear.bias) for _, linear in new]  # a LoRALinear takes these over
    built, installed = [], []
    try:
        for _, linear in new:
            cls = QuantizedLoRALinear if is_quantized_linear(linear) else LoRALinear
            built.append(cls(linear, config.rank, config.alpha, config.dropout, config.rslora, config.dtype))
        for (name, linear), wrapped in zip(new, built, strict=True):
            _set_submodule(model, name, wrapped)
            installed.append((name, linear))
    except BaseException:
        for name, linear in reversed(installed):
            _set_submodule(model, name, linear)
        for linear, weight, bias in owned:  # the originals get their own Parameters back
            linear.register_parameter("weight", weight)
            linear.register_parameter("bias", bias)
        for p, flag in flags:
            p.requires_grad_(flag)
        _restore_rng_states(rng)
        raise
    if not hasattr(model, _REQUIRES_GRAD):
        object.__setattr__(model, _REQUIRES_GRAD, old_flags)
    for pname, p in model.named_parameters():
        is_lora = pname.endswith(".lora_A") or pname.endswith(".lora_B")
        p.requires_grad_(is_lora)
    return sorted(existing + [n for n, _ in new])


def revert(model: nn.Module, merge: bool = False) -> list[str]:
    """Put the original ``nn.Linear`` modules back, in place.

    All or nothing: with ``merge`` (or for an adapter merged earlier), every module's new
    weight is computed and checked first; if any is not finite (a non-finite adapter, or an
    overflow of the weight's dtype) or cannot be computed, nothing has changed.

    Args:
        merge: fold each adapter into its base weight first (``W ← W + s·B·A``).
            Without it the base weights come back bit-identical (an adapter that
            was merged with :meth:`LoRALinear.merge` is unmerged, which is exact
            only up to the weight's precision).

    Returns:
        The paths of the modules restored. The parameters' ``requires_grad``
        flags from before :func:`patch_llama` are restored too.

    Raises:
        TypeError: ``merge`` is not a bool.
        ValueError: a merged or unmerged weight would not be finite (the message names the modules).
        QuantizedBaseError: ``merge=True`` with a quantized base (a ``ValueError``; the message names
            the modules): the merged weight cannot be stored in 4-bit or 8-bit storage.
    """
    if not isinstance(merge, bool):
        raise TypeError(f"revert: merge must be a bool, got {merge!r}")
    modules = lora_modules(model)
    quantized = [n for n, m in modules.items() if isinstance(m, QuantizedLoRALinear)]
    if merge and quantized:
        kinds = sorted({modules[n].quantization for n in quantized})
        more = f" and {len(quantized) - 1} more module(s)" if len(quantized) > 1 else ""
        raise QuantizedBaseError(
            f"revert(merge=True): {quantized[0]}{more} have a quantized base (bitsandbytes {'/'.join(kinds)}); "
            "W + s·B·A cannot be written into quantized storage without requantizing it, which rounds away most of the "
            "adapter's update and changes the base for good. Call revert(model) (merge=False) and keep the adapter "
            "separate (save_peft_adapter), or load the base unquantized and merge there; nothing was changed")
    # A module's weight changes if it is merged now, or unmerged; +1 / -1 is the sign of s·B·A.
    signs = {name: (+1 if merge else -1) for name, m in modules.items() if m.merged != merge}
    bad = []
    for name, sign in signs.items():  # 1. check (one folded weight at a time: no copy of the model)
        try:
            modules[name].folded_weight(sign)
        except ValueError:
            bad.append(name)
    if bad:
        raise ValueError(f"revert(merge={merge}): the {'merged' if merge else 'unmerged'} weight of {bad[:3]}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} would not be finite "
                         "(non-finite lora_A/lora_B, or beyond the weight's dtype); nothing was changed")
    # 2. swap the modules back (undone exactly if a swap fails), 3. write the weights
    swapped = []
    try:
        for name, module in modules.items():
            _set_submodule(model, name, module.to_linear())
            swapped.append(name)
    except BaseException:
        for name in swapped:
            _set_submodule(model, name, modules[name])
        for module in modules.values():  # the shell kept aside holds no parameter again
            if isinstance(module, QuantizedLoRALinear):  # it keeps its own (it always holds them)
                continue
            module._base.register_parameter("weight", None)
            module._base.register_parameter("bias", None)
        raise
    with torch.no_grad():
        for name, sign in signs.items():
            modules[name].weight.copy_(modules[name].folded_weight(sign))
            modules[name].merged = merge
    flags = getattr(model, _REQUIRES_GRAD, None)
    if flags is not None:
        for pname, p in model.named_parameters():
            if pname in flags:
                p.requires_grad_(flags[pname])
        object.__delattr__(model, _REQUIRES_GRAD)
    return sorted(modules)
