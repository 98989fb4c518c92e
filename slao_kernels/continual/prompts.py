"""Prompts and answers as token ids, and their batches.

Every row becomes a prompt and an answer::

    {instruction}
    Options: {label 1}, {label 2}, ...
    {input text}
    Answer:          <- prompt ends here
     {label}         <- answer tokens (a leading space, no end-of-text)

The pieces are tokenized separately and concatenated, so a long input is cut
to ``max_prompt_tokens`` on the input alone (instruction, options and the
answer cue always survive), and an option's tokens are the same whatever
prompt precedes them: training targets and evaluation options match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slao_kernels.continual.tasks import Example, Task

MIN_INPUT_TOKENS = 16  # what is left of the input, at least, when a prompt is truncated


class PromptEncoder:
    """Turns task rows into token ids with a Hugging Face tokenizer.

    Args:
        tokenizer: the model's tokenizer.
        max_prompt_tokens: prompt length cap; the input text is truncated to fit.
    """

    def __init__(self, tokenizer, max_prompt_tokens: int = 256):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = int(max_prompt_tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an end-of-text token to pad batches with")
        self.pad_id = int(pad)
        self._head_cache: dict[str, list[int]] = {}
        self._tail = self._ids("\nAnswer:")

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def head(self, task: Task) -> list[int]:
        """Token ids of the instruction and the options (with the tokenizer's BOS, if it uses one)."""
        if task.name not in self._head_cache:
            text = f"{task.instruction}\nOptions: {', '.join(task.labels)}\n"
            self._head_cache[task.name] = self._ids(text, special=True)
        return self._head_cache[task.name]

    def prompt(self, task: Task, text: str) -> list[int]:
        """Token ids of a full prompt, the input cut to fit ``max_prompt_tokens``."""
        head = self.head(task)
        room = max(MIN_INPUT_TOKENS, self.max_prompt_tokens - len(head) - len(self._tail))
        return head + self._ids(text)[:room] + self._tail

    def answer(self, label: str) -> list[int]:
        """Token ids of an answer (``" " + label``)."""
        ids = self._ids(" " + label)
        if not ids:
            raise ValueError(f"label {label!r} tokenizes to nothing")
        return ids

    def options(self, task: Task) -> list[list[int]]:
        """Token ids of every label of ``task``, in label order."""
        return [self.answer(label) for label in task.labels]

    def encode(self, task: Task, example: Example) -> tuple[list[int], list[int]]:
        """``(prompt ids, answer ids)`` of one row."""
        return self.prompt(task, example.text), self.answer(example.label)


@dataclass
class AnswerBatch:
    """Prompt + answer sequences, right-padded, with where the answer tokens are.

    ``rows[k], positions[k]`` is the position whose output predicts the
    answer token ``targets[k]`` (the position before that token).
    """

    input_ids: torch.Tensor       # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64
    rows: torch.Tensor            # (N,) int64
    positions: torch.Tensor       # (N,) int64
    targets: torch.Tensor         # (N,) int64

    def to(self, device) -> AnswerBatch:
        return AnswerBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.rows,
                                                    self.positions, self.targets)))


def collate_answers(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> AnswerBatch:
    """Batch ``(prompt ids, answer ids)`` pairs for training on the answer tokens only."""
    length = max(len(p) + len(a) for p, a in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    rows, positions, targets = [], [], []
    for b, (p, a) in enumerate(pairs):
        seq = p + a
        input_ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        rows += [b] * len(a)
        positions += range(len(p) - 1, len(seq) - 1)
        targets += a
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return AnswerBatch(input_ids, mask, as_long(rows), as_long(positions), as_long(targets))
