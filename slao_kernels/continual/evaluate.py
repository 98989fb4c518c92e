r"""Exact option scoring: accuracy without generation.

For every test row the model scores each label option by its log-likelihood
``Σ_t log p(option_t | prompt, option_<t)``; the prediction is the best option
(ties go to the first label). This is exact — no sampling, no parsing of
generated text.

The prompt is run once per row, not once per option: prompts are left-padded
into a batch and encoded with the KV cache kept; then each multi-token option
runs its tokens on that cache (appended, then cropped off again), for the
whole batch at once. The output head (49k
columns for SmolLM2, the largest GEMM on a CPU) is applied only at the
positions that predict an option token.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from slao_kernels.continual.prompts import PromptEncoder
from slao_kernels.continual.tasks import Task


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states) and the output head of a causal LM."""
    decoder, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if decoder is None or decoder is model or head is None:
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM with a decoder and an output head")
    return decoder, head


def _token_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of hidden (N, d); the softmax in fp32."""
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def _cache_argument(decoder: nn.Module) -> str:
    """The name under which this decoder takes and returns its KV cache: ``cache`` in recent
    transformers releases (5.24 here), ``past_key_values`` in earlier ones (where the newer
    releases accept the old name, they warn)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@torch.inference_mode()
def score_options(model: nn.Module, prompts: list[list[int]], options: list[list[int]],
                  pad_id: int) -> torch.Tensor:
    """Log-likelihood of every option after every prompt: a (len(prompts), len(options)) fp32 tensor.

    Args:
        model: a Hugging Face causal LM.
        prompts: token ids of each prompt (one batch; see :func:`evaluate_task` for batching).
        options: token ids of each option, shared by all prompts.
        pad_id: token used for padding (never attended to).
    """
    decoder, head = decoder_and_head(model)
    device = head.weight.device
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[b, width - len(p):] = torch.tensor(p, device=device)
        mask[b, width - len(p):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1, as without padding
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.tensor([o[0] for o in options], device=device)
    last_hidden = out.last_hidden_state[:, -1]  # predicts the first option token
    logits = head(last_hidden).float().log_softmax(-1)
    scores = logits[:, first].clone()  # (n, k)
    # The rest of each option, one option at a time on the shared prompt cache: the
    # option's tokens are appended to it and cropped off again (repeating the cache
    # K times instead would copy it K times).
    cache_name = _cache_argument(decoder)
    cache = getattr(out, cache_name)
    for j, option in enumerate(options):
        if len(option) == 1:
            continue
        ids_j = torch.tensor(option[:-1], device=device).expand(n, -1)  # the last token predicts nothing
        mask_j = torch.cat([mask, torch.ones_like(ids_j)], dim=1)
        pos_j = lengths[:, None] + torch.arange(len(option) - 1, device=device)
        hidden = decoder(input_ids=ids_j, attention_mask=mask_j, position_ids=pos_j, use_cache=True,
                         **{cache_name: cache}).last_hidden_state  # (n, len − 1, d)
        cache.crop(-(len(option) - 1))  # a negative count removes that many tokens (transformers 4.4x to 5.x)
        if cache.get_seq_length() != width:
            raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} positions after cropping, "
                               f"expected {width}")
        targets = torch.tensor(option[1:], device=device).repeat(n)
        logp = _token_logprobs(head, hidden.reshape(-1, hidden.shape[-1]), targets)
        scores[:, j] += logp.view(n, -1).sum(1)
    return scores


def evaluate_task(model: nn.Module, encoder: PromptEncoder, task: Task, batch_size: int = 16,
                  max_rows: int | None = None, progress=None) -> dict:
    """Accuracy of ``model`` on ``task``'s test rows by option scoring.

    Returns ``{"accuracy", "correct", "total", "predictions"}`` (predictions are label indices).
    ``progress`` is an optional callable advanced by the number of rows done.
    """
    rows = task.test if max_rows is None else task.test[:max_rows]
    options = encoder.options(task)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            scores = score_options(model, [encoder.prompt(task, r.text) for r in chunk], options, encoder.pad_id)
            predictions += scores.argmax(1).tolist()
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    correct = sum(task.labels[p] == r.label for p, r in zip(predictions, rows, strict=True))
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows), "predictions": predictions}


def brute_force_scores(model: nn.Module, prompts: list[list[int]], options: list[list[int]]) -> torch.Tensor:
    """The definition :func:`score_options` computes, one full forward per (prompt, option):
    for tests and for checking a new model family."""
    device = model.get_output_embeddings().weight.device
    scores = torch.empty(len(prompts), len(options))
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            for j, o in enumerate(options):
                logits = model(input_ids=torch.tensor([p + o], device=device)).logits[0].float()
                logp = F.log_softmax(logits[len(p) - 1:len(p) + len(o) - 1], dim=-1)
                scores[i, j] = logp.gather(1, torch.tensor(o, device=device)[:, None]).sum()
    return scores
