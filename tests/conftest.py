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


# --------------------------------------------------------------------------- SLAO state helpers


def fake_finetune(slao, task, seed_offset=0):
    """Stand-in for training: move every adapter factor by a task-specific amount."""
    g = torch.Generator().manual_seed(1000 * task + seed_offset)
    with torch.no_grad():
        for p in slao.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def run_tasks(slao, tasks):
    """``begin_task`` / :func:`fake_finetune` / ``end_task`` for each task number in ``tasks``."""
    for i in tasks:
        slao.begin_task()
        fake_finetune(slao, i)
        slao.end_task()


def patched_model(rank=4, targets=("q_proj", "v_proj"), **model_kw):
    """A tiny Llama with adapters of ``rank`` on ``targets``."""
    from slao_kernels import LoRAConfig, patch_llama

    model = tiny_model(**model_kw)
    patch_llama(model, LoRAConfig(rank=rank, targets=targets))
    return model


def snapshot(model):
    """A copy of every tensor of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, snap):
    """Whether the model's state dict still equals :func:`snapshot`'s copy, bit for bit."""
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


class Crash(Exception):
    """A failure injected into a file-system step (a full disk, a dying process)."""


def tree(root):
    """{relative path: bytes} of every file under root (hidden ones included)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a Hugging Face model directory (what ``--model`` takes)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
