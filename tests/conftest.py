"""Test setup: Triton runs in its CPU interpreter unless a CUDA device is present.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here,
at collection time, before any test module imports slao_kernels.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("SLAO_DATA_DIR", os.path.join(REPO, "..", "shared", "data", "cl_benchmark"))
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Device the Triton launchers are tested on: the GPU when there is one, else the interpreter on CPU."""


def assert_close_to_ref(out, out_pt, out_ref, name=""):
    """flash-attention's rule: the kernel's error against a high-precision
    reference ``out_ref`` is at most twice that of torch computing in the input
    dtype (``out_pt``), plus one rounding of the output's dtype at its scale
    (``atol``, for summation-order differences where torch happens to be exact)."""
    eps = torch.finfo(out_pt.dtype if out_pt.dtype != torch.float64 else torch.float32).eps
    out, out_pt, out_ref = out.double().cpu(), out_pt.double().cpu(), out_ref.double().cpu()
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    scale = out_ref.abs().max().item() if out_ref.numel() else 0.0
    err = (out - out_ref).abs().max().item() if out.numel() else 0.0
    base = (out_pt - out_ref).abs().max().item() if out.numel() else 0.0
    atol = eps * max(scale, 1.0)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 × torch's {base:.3g} + atol {atol:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(arch="llama", **overrides):
    """A 2-layer model of the given Llama-family architecture, small enough for CPU tests."""
    import transformers

    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    kwargs.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    return cls(**kwargs)


def tiny_model(arch="llama", dtype=torch.float32, **overrides):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.to(dtype).eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained here on task-like text: no model hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slao_kernels.continual.tasks import GENERATED_RULES

    corpus = [rule.instruction for rule in GENERATED_RULES.values()] * 20
    corpus += [f"Options: yes, no\nNumber: {n}\nAnswer: {'yes' if n % 2 else 'no'}" for n in range(100, 1000, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@contextlib.contextmanager
def interrupted_at_task(task: int):
    """Inside this block, run_stream is interrupted (KeyboardInterrupt, as by Ctrl-C) when it
    starts training task ``task`` (1-based); the block expects that interrupt."""
    from slao_kernels.continual import runner

    real, calls = runner.train_task, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == task:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "train_task", train)
        with pytest.raises(KeyboardInterrupt) as interrupt:
            yield interrupt  # after the block: .value is the exception run_stream raised
