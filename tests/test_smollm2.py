"""The real SmolLM2-135M-Instruct, patched, learns a real task while its base weights stay put."""

import json
import os

import pytest
import torch
from conftest import DATA_DIR

from slao_kernels import LoRAConfig, LoRALinear, patch_llama, revert
from slao_kernels.continual.models import load_default_model


@pytest.fixture(scope="module")
def smollm2():
    return load_default_model(torch.float32)


def _batch(tokenizer, rows, labels):
    """Prompt + answer token ids; the loss sees only the answer tokens."""
    ids, targets = [], []
    for row in rows:
        prompt = tokenizer.encode(f"Classify the sentiment as {' or '.join(labels)}.\n{row['sentence']}\nAnswer:")
        answer = tokenizer.encode(" " + row["label"]) + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    labels_t = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask, labels_t


def test_patched_smollm2_learns_sst2_and_keeps_base_weights(smollm2):
    model, tokenizer = smollm2
    task = os.path.join(DATA_DIR, "sst2")
    with open(os.path.join(task, "train.json")) as f:
        rows = json.load(f)
    with open(os.path.join(task, "labels.json")) as f:
        labels = json.load(f)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = patch_llama(model, LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
    assert len(names) == 2 * model.config.num_hidden_layers == 60
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)

    held_out = _batch(tokenizer, rows[-16:], labels)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=held_out[0], attention_mask=held_out[1], labels=held_out[2]).loss.item()

    before = held_out_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(8):
        ids, mask, lab = _batch(tokenizer, rows[step * 8:(step + 1) * 8], labels)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.8 * before, f"held-out answer loss {before:.3f} -> {after:.3f}"

    revert(model)
    state = model.state_dict()
    assert state.keys() == base.keys()
    assert all(torch.equal(state[k], base[k]) for k in base), "a base weight changed during LoRA training"


@pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"no task data at {DATA_DIR}")
def test_slao_run_on_two_real_tasks_learns_the_first(smollm2):
    """The runner on the real model and real data: agnews (4 topics, ~0.4 zero-shot on these
    rows) then sst2, 15 steps each. Evaluation is exact option scoring on 48 test rows, so one
    row is 0.021 of accuracy; a rise of 0.1 is 5 rows, far beyond what reordering float sums moves."""
    from slao_kernels.continual import RunConfig, TrainConfig, load_task_dir, run_stream
    from slao_kernels.patching import lora_modules

    model, tokenizer = smollm2
    if lora_modules(model):  # the test above failed before it reverted
        revert(model)
    tasks = load_task_dir(DATA_DIR, "agnews,sst2")
    report = run_stream(model, tokenizer, tasks, RunConfig(train=TrainConfig(steps=15, batch_size=8), max_test=48,
                                                           max_prompt_tokens=128), progress=False, log=print)
    R, R0 = report["accuracy_matrix"], report["zero_shot"]
    assert R[0][0] >= R0[0] + 0.1, f"agnews accuracy {R0[0]:.3f} zero-shot -> {R[0][0]:.3f} after training it"
    assert report["status"] == "complete" and report["adapter_bytes"][0] == report["adapter_bytes"][1]
    revert(model)
