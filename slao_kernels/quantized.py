"""LoRA adapters on a quantized frozen base (QLoRA-style): bitsandbytes ``Linear4bit`` and ``Linear8bitLt``.

:func:`slao_kernels.patch_llama` wraps a bitsandbytes layer (NF4 or FP4 with any compute dtype and
with or without double quantization, as ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
builds it, or 8-bit ``Linear8bitLt`` without fp16 weights) in a :class:`QuantizedLoRALinear`. The
base stays quantized in memory, bit for bit: its packed weight and quant-state tensors are read, never
written. Each call dequantizes that layer's weight to the compute dtype, runs the fused op on it
(:func:`slao_kernels.ops.lora_linear_dequant.lora_linear_dequant`) and drops it; the backward
dequantizes again for ``dx``. The extra memory is one layer's dequantized weight at a time.

What the base computes is what bitsandbytes' own training-mode forward computes on CPU:

* 4-bit: ``x`` cast to the layer's ``compute_dtype`` (``x``'s dtype when it has none), the weight
  dequantized directly to that dtype, ``x·Wᵀ + b``, the result cast back to ``x``'s dtype;
* 8-bit: ``W = CB·(SCB/127)`` in ``x``'s dtype (bitsandbytes' ``MatMul8bitFp``). bitsandbytes' *eval*
  forward of an 8-bit layer quantizes the activations too (LLM.int8()); the adapter's base does not.

Refused on a quantized base (:class:`QuantizedBaseError`, before anything changes): merging the adapter
into the base (``merge``, ``revert(merge=True)``) and the strategies that rewrite the base weights
(LoRA-GA, SLICE). A 4-bit layer that bitsandbytes has repacked for CPU inference (an eval-mode forward
without gradients does it on CPUs with AVX512-BF16) is refused by :func:`patch_llama`: that format
has no dequantization.

bitsandbytes is imported only when a quantized model is built (:func:`quantize_linears`) or when it is
already imported (a model that holds its layers has imported it): ``import slao_kernels`` never loads it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from slao_kernels._checks import (
    FLOAT_DTYPES,
    check_adapter_dtype,
    check_alpha,
    check_dropout,
    check_rank,
    check_rslora,
    check_scaling,
    lora_scaling,
)
from slao_kernels.nn import LoRALinear, StackedLoRALinear
from slao_kernels.ops.lora_linear_dequant import linear_dequant, lora_linear_dequant

QUANTIZATIONS = ("nf4", "fp4", "int8")
"""The quantizations of a frozen base that :func:`quantize_linears` builds and the adapters take."""


class QuantizedBaseError(ValueError):
    """An operation that would write the base weights was asked of a quantized base; nothing was changed."""


def _bnb_classes() -> tuple[type, ...]:
    """bitsandbytes' ``(Linear4bit, Linear8bitLt)``, or ``()`` when bitsandbytes is not imported (then no
    module of any model can be one of them, and it is not imported just to say so)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (False without bitsandbytes)."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def quantization_of(module: nn.Module) -> str:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes layer (the 4-bit type from its weight)."""
    classes = _bnb_classes()
    if classes and isinstance(module, classes[0]):
        return module.weight.quant_type
    if classes and isinstance(module, classes[1]):
        return "int8"
    raise TypeError(f"quantization_of: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}")


def _scb(module: nn.Module) -> torch.Tensor | None:
    """The row scales of an 8-bit layer: on the weight until its first forward, then on its state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else getattr(module.state, "SCB", None)


def check_quantized_base(module: nn.Module, where: str = "QuantizedLoRALinear") -> None:
    """Check that ``module`` is a bitsandbytes layer whose storage the adapter can dequantize.

    Raises ``TypeError``/``ValueError`` naming ``where``, what was expected and what was found: a
    ``Linear4bit`` must hold a quantized ``Params4bit`` (NF4 or FP4) whose quant state has the layer's
    shape and is not bitsandbytes' CPU inference repacking, with a floating compute dtype or none; a
    ``Linear8bitLt`` must hold int8 weights of the layer's shape (``has_fp16_weights=False``) and
    their float32 row scales ``SCB``.
    """
    classes = _bnb_classes()
    if not classes or not isinstance(module, classes):
        raise TypeError(f"{where}: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}")
    shape = (module.out_features, module.in_features)
    weight = module.weight
    if isinstance(module, classes[0]):
        state = getattr(weight, "quant_state", None)
        if not getattr(weight, "bnb_quantized", False) or state is None:
            raise ValueError(f"{where}: the Linear4bit's weight is not quantized yet (bnb_quantized="
                             f"{getattr(weight, 'bnb_quantized', None)}, quant_state={state}); move it to its "
                             "device first (bitsandbytes quantizes on .to(device))")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(f"{where}: bitsandbytes repacked this Linear4bit for CPU inference (an eval-mode "
                             "forward without gradients does that on CPUs with AVX512-BF16; quant_state."
                             "packing_format_for_cpu=True), a format with no dequantization; load the model again "
                             "and patch it before running it in eval mode")
        if state.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"{where}: quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
        if tuple(state.shape) != shape:
            raise ValueError(f"{where}: the quant state has shape {tuple(state.shape)}, but the Linear4bit says "
                             f"(out_features, in_features) = {shape}")
        if module.compute_dtype is not None and module.compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: compute_dtype must be None or float32/bfloat16/float16/float64, got "
                            f"{module.compute_dtype}")
    else:
        if getattr(module.state, "has_fp16_weights", False) or weight.dtype != torch.int8:
            raise ValueError(f"{where}: expected an 8-bit Linear8bitLt with int8 weights (has_fp16_weights=False), "
                             f"got has_fp16_weights={module.state.has_fp16_weights}, weight dtype {weight.dtype}")
        if tuple(weight.shape) != shape:
            raise ValueError(f"{where}: the int8 weight has shape {tuple(weight.shape)}, but the Linear8bitLt says "
                             f"(out_features, in_features) = {shape}")
        scb = _scb(module)
        if scb is None or scb.dtype != torch.float32 or tuple(scb.shape) != (shape[0],):
            raise ValueError(f"{where}: expected float32 row scales SCB of shape ({shape[0]},), got "
                             f"{None if scb is None else (scb.dtype, tuple(scb.shape))}")
    bias = module.bias
    if bias is not None and (bias.dtype not in FLOAT_DTYPES or tuple(bias.shape) != (shape[0],)):
        raise ValueError(f"{where}: the bias must be None or a floating ({shape[0]},) tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")


def base_compute_dtype(module: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the base product of ``module`` runs in for activations of ``x_dtype``: a 4-bit
    layer's ``compute_dtype`` when it has one, else ``x_dtype``."""
    classes = _bnb_classes()
    if classes and isinstance(module, classes[0]) and module.compute_dtype is not None:
        return module.compute_dtype
    return x_dtype


@torch.no_grad()
def dequantize_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes layer in ``dtype``, as a new tensor; the layer is not changed.

    4-bit: bitsandbytes' ``dequantize_4bit`` op straight to ``dtype`` (its block scales first
    dequantized from their 8-bit copy with double quantization), as its own matmul does. 8-bit:
    ``CB·(SCB/127)`` in ``dtype``, as its CPU training-mode matmul does.
    """
    import bitsandbytes.functional as bnb_f

    weight = module.weight
    if quantization_of(module) == "int8":
        return weight.data.to(dtype).mul_(_scb(module).unsqueeze(1).mul(1.0 / 127.0))
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        absmax = absmax.float()
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data.view(-1, 1), absmax, state.blocksize,
                                                          state.quant_type, state.shape, dtype)


def quantized_storage(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that holds a bitsandbytes layer's quantized base, by name (the packed or int8
    weight, the quant state's block scales, code book and nested scales, or the 8-bit row scales),
    and the bias: the tensors themselves, not copies (for checks that the base was not written)."""
    kind = quantization_of(module)
    out = {"weight": module.weight.data}
    if kind == "int8":
        out["SCB"] = _scb(module)
    else:
        state = module.weight.quant_state
        out.update({"absmax": state.absmax, "code": state.code})
        if state.nested:
            out.update({"nested_absmax": state.state2.absmax, "nested_code": state.state2.code,
                        "offset": torch.as_tensor(state.offset)})
    if module.bias is not None:
        out["bias"] = module.bias.data
    return out


class QuantizedLoRALinear(LoRALinear):
    """A :class:`~slao_kernels.nn.LoRALinear` whose frozen base is a bitsandbytes 4-bit or 8-bit layer.

    ``y = base(x) + scaling·(dropout(x)·Aᵀ)·Bᵀ`` where ``base(x)`` is the layer's product on its
    weight dequantized per call (module docstring). The bitsandbytes layer is kept aside, unregistered,
    with its own Parameters, which this module registers too (so ``model.parameters()`` still holds
    them); the state dict keeps the layer's keys (``weight``, its quant state or ``SCB``, ``bias``) and
    adds ``lora_A``/``lora_B``. Loading a state dict writes the adapter; its base entries must equal
    the stored base bit for bit (a quantized base is never overwritten).

    Args are those of :class:`~slao_kernels.nn.LoRALinear`; ``dtype=None`` gives fp32 adapters.
    ``merge``/``unmerge``/``folded_weight`` raise :class:`QuantizedBaseError`.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__(base, rank, alpha, dropout, rslora, dtype)
        # LoRALinear moved the Parameters out of the layer; the layer keeps them too (it reads its own
        # weight and quant state when the state dict is saved, and comes back whole in to_linear()).
        base.register_parameter("weight", self.weight)
        base.register_parameter("bias", self.bias)
        self.quantization = quantization_of(base)

    @staticmethod
    def check_args(base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                   dtype: torch.dtype | None = None, where: str = "QuantizedLoRALinear") -> tuple:
        """:meth:`LoRALinear.check_args` for a bitsandbytes base (:func:`check_quantized_base`); the
        default adapter dtype is float32 and the scaling must be representable in it and in the
        layer's compute dtype. Returns ``(rank, alpha, dropout, rslora, lora_dtype)``."""
        check_quantized_base(base, where)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{where}: rank must be an int, got {rank!r} ({type(rank).__name__})")
        check_rank(rank, base.in_features, base.out_features, where)
        alpha = check_alpha(alpha, f"{where}: alpha")
        dropout = check_dropout(dropout, f"{where}: dropout")
        rslora = check_rslora(rslora, f"{where}: rslora")
        check_adapter_dtype(dtype, f"{where}: dtype")
        lora_dtype = dtype or torch.float32
        dtypes = (lora_dtype, base_compute_dtype(base, lora_dtype))
        check_scaling(lora_scaling(alpha, rank, rslora), dtypes,
                      f"{where}: scaling = alpha/{'√' if rslora else ''}rank")
        return rank, alpha, dropout, rslora, lora_dtype

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight dequantized to ``dtype`` (a new out×in tensor; :func:`dequantize_weight`)."""
        return dequantize_weight(self._base, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = base_compute_dtype(self._base, x.dtype)
        xc = x.to(cdt)
        bias = None if self.bias is None else self.bias.to(cdt)

        def dequantize():
            return dequantize_weight(self._base, cdt)

        if isinstance(self.dropout, nn.Dropout) and self.training:
            out = linear_dequant(xc, dequantize, bias) + self.delta(self.dropout(xc)).to(cdt)
        else:
            A, B = self._factors()
            out = lora_linear_dequant(xc, dequantize, bias, A, B, self.scaling)
        return out.to(x.dtype)

    def _refuse(self, what: str):
        raise QuantizedBaseError(
            f"QuantizedLoRALinear.{what} ({self.in_features}→{self.out_features}, rank {self.rank}): the base is a "
            f"bitsandbytes {self.quantization} layer; W + s·B·A cannot be "
            "written into quantized storage without requantizing it, which rounds away most of the adapter's "
            "update and changes the base for good. Keep the adapter separate (save_peft_adapter), or load the "
            "base unquantized to merge; nothing was changed")

    def folded_weight(self, sign: int = 1) -> torch.Tensor:
        """Refused: a quantized base has no weight to fold into (:class:`QuantizedBaseError`)."""
        self._refuse("folded_weight()")

    def merge(self) -> None:
        """Refused: a quantized base cannot hold the merged weight (:class:`QuantizedBaseError`)."""
        self._refuse("merge()")

    def unmerge(self) -> None:
        """Refused: a quantized base is never merged (:class:`QuantizedBaseError`)."""
        self._refuse("unmerge()")

    def to_linear(self) -> nn.Module:
        """The original bitsandbytes layer, with its Parameters and quant state as they were."""
        return self._base

    def _base_state(self, keep_vars: bool) -> dict:
        state = {}
        self._base._save_to_state_dict(state, "", keep_vars)
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in self._base_state(keep_vars).items():  # the layer's own keys and format
            destination[prefix + key] = value
        for name in ("lora_A", "lora_B"):
            p = self._parameters[name]
            destination[prefix + name] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        base = self._base_state(keep_vars=False)
        for key, stored in base.items():
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            given = state_dict[prefix + key]
            if not (isinstance(given, torch.Tensor) and given.dtype == stored.dtype and given.shape == stored.shape
                    and torch.equal(given.to(stored.device), stored)):
                error_msgs.append(f"{prefix}{key}: the quantized base is frozen and never overwritten, and the state "
                                  "dict's entry differs from it (load the base with from_pretrained instead)")
        for name in ("lora_A", "lora_B"):
            key = prefix + name
            param = self._parameters[name]
            if key not in state_dict:
                missing_keys.append(key)
                continue
            given = state_dict[key]
            if not isinstance(given, torch.Tensor) or given.shape != param.shape:
                error_msgs.append(f"{key}: expected a tensor of shape {tuple(param.shape)}, got "
                                  f"{tuple(getattr(given, 'shape', ()))} ({type(given).__name__})")
                continue
            with torch.no_grad():
                param.copy_(given)
        if strict:
            known = set(base) | {"lora_A", "lora_B"}
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):] not in known \
                        and key[len(prefix):].split(".", 1)[0] not in self._modules:
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantization={self.quantization}"


class QuantizedStackedLoRALinear(StackedLoRALinear, QuantizedLoRALinear):
    """:class:`~slao_kernels.nn.StackedLoRALinear` (IncLoRA's and O-LoRA's frozen adapters) on a quantized
    base: the stacked factors of the one, the dequantizing forward and the refusals of the other."""


QuantizedLoRALinear.stacked_class = QuantizedStackedLoRALinear


def quantize_linears(model: nn.Module, quantization: str, targets: Sequence[str] | None = None,
                     compute_dtype: torch.dtype | None = None, double_quant: bool = True) -> list[str]:
    """Replace ``model``'s ``nn.Linear`` projections by bitsandbytes layers holding their weights quantized, in place.

    For a model loaded unquantized (e.g. the embedded SmolLM2 from its GGUF file), what
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` gives a Hugging Face model.

    Args:
        quantization: ``"nf4"``, ``"fp4"`` (``Linear4bit``, block size 64) or ``"int8"`` (``Linear8bitLt``).
        targets: last path components to quantize; default the Llama projections
            (``patching.LLAMA_PROJECTIONS``). The embeddings and the LM head stay as they are.
        compute_dtype: a 4-bit layer's compute dtype; default the weight's dtype.
        double_quant: quantize the 4-bit block scales too (bitsandbytes' ``compress_statistics``).

    Everything is checked, and every replacement built, before the model is changed: on any error it
    is as before. Returns the paths replaced, sorted.

    Raises:
        ImportError: bitsandbytes is not installed (``pip install slao_kernels[quant]``).
        ValueError: an unknown ``quantization``, or no target matched an ``nn.Linear``.
        TypeError: a wrong type of ``compute_dtype`` or ``double_quant``, or a target's weight dtype.
    """
    from slao_kernels.patching import LLAMA_PROJECTIONS

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantize_linears: quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_linears: compute_dtype must be None, float32, bfloat16 or float16, "
                        f"got {compute_dtype!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantize_linears: double_quant must be a bool, got {double_quant!r}")
    targets = tuple(LLAMA_PROJECTIONS if targets is None else targets)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError("quantize_linears needs bitsandbytes: pip install 'slao_kernels[quant]'") from exc
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and name.rpartition(".")[2] in targets]
    if not found:
        raise ValueError(f"quantize_linears: no nn.Linear named {list(targets)} in {type(model).__name__}")
    for name, m in found:
        if m.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"quantize_linears: {name}.weight must be float32/bfloat16/float16, got {m.weight.dtype}")
    built = []
    for name, m in found:  # quantized copies first; the model is untouched until every one exists
        device = m.weight.device
        if quantization == "int8":
            q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False,
                                    device="meta")
            q.weight = bnb.nn.Int8Params(m.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=compute_dtype or m.weight.dtype, compress_statistics=double_quant,
                                  quant_type=quantization, device="meta")
            q.weight = bnb.nn.Params4bit(m.weight.detach().clone(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=quantization, module=q)
        if m.bias is not None:
            q.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        built.append((name, q.to(device).train(m.training)))
    for name, q in built:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return sorted(name for name, _ in built)
