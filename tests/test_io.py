"""SLAO checkpoints (bit-identical resume, corruption, mismatch, crash safety)
and PEFT-format adapters (round trip, PEFT's documented layout, mismatch)."""

import copy
import json
import os

import pytest
import torch
from conftest import tiny_model

from slao_kernels import SLAO, LoRAConfig, load_peft_adapter, patch_llama, save_peft_adapter
from slao_kernels.patching import lora_modules

IDS = torch.randint(0, 96, (2, 8))


def fake_finetune(slao, task):
    g = torch.Generator().manual_seed(1000 * task)
    with torch.no_grad():
        for p in slao.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def run_tasks(slao, tasks):
    for i in tasks:
        slao.begin_task()
        fake_finetune(slao, i)
        slao.end_task()


def patched_model(rank=4, targets=("q_proj", "v_proj"), **model_kw):
    model = tiny_model(**model_kw)
    patch_llama(model, LoRAConfig(rank=rank, targets=targets))
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("merge", ["B", "AB"])
def test_resume_is_bit_identical(tmp_path, merge):
    pristine = patched_model()
    straight = copy.deepcopy(pristine)
    run_tasks(SLAO(straight, merge=merge), range(1, 6))

    first = copy.deepcopy(pristine)
    slao = SLAO(first, merge=merge)
    run_tasks(slao, range(1, 4))
    slao.save(str(tmp_path / "ckpt"))
    resumed_model = copy.deepcopy(pristine)
    resumed = SLAO.load(resumed_model, str(tmp_path / "ckpt"))
    assert resumed.task_index == 3 and resumed.merge == merge
    run_tasks(resumed, range(4, 6))
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k


def test_corrupted_truncated_and_missing_checkpoints(tmp_path):
    model = patched_model()
    slao = SLAO(model)
    run_tasks(slao, [1])
    path = tmp_path / "ckpt"
    slao.save(str(path))
    target = patched_model()
    snap = snapshot(target)
    tensor_file = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(tensor_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SLAO.load(target, str(path))
    tensor_file.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SLAO.load(target, str(path))
    (path / "slao.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SLAO.load(target, str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SLAO.load(target, str(tmp_path / "nowhere"))
    assert unchanged(target, snap)


@pytest.mark.parametrize("other", [dict(rank=2), dict(targets=("q_proj", "k_proj")), dict(hidden_size=32)])
def test_mismatched_checkpoint_is_refused_and_model_untouched(tmp_path, other):
    slao = SLAO(patched_model())
    run_tasks(slao, [1, 2])
    slao.save(str(tmp_path))
    target = patched_model(**other)
    snap = snapshot(target)
    with pytest.raises(ValueError, match="does not fit this model"):
        SLAO.load(target, str(tmp_path))
    assert unchanged(target, snap)


def test_save_is_crash_safe_and_refused_mid_task(tmp_path, monkeypatch):
    slao = SLAO(patched_model())
    run_tasks(slao, [1])
    slao.save(str(tmp_path))
    first = json.loads((tmp_path / "slao.json").read_text())
    run_tasks(slao, [2])
    real_replace = os.replace

    def crash_on_json(src, dst):
        if str(dst).endswith("slao.json"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_json)
    with pytest.raises(OSError, match="simulated crash"):
        slao.save(str(tmp_path))
    monkeypatch.undo()
    assert json.loads((tmp_path / "slao.json").read_text()) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert SLAO.load(patched_model(), str(tmp_path)).task_index == 1  # the old checkpoint, intact
    slao.begin_task()
    with pytest.raises(RuntimeError, match="in progress"):
        slao.save(str(tmp_path))


def test_peft_round_trip_into_an_unpatched_model(tmp_path):
    model = patched_model()
    slao = SLAO(model)
    run_tasks(slao, [1, 2])
    files = save_peft_adapter(model, str(tmp_path), base_model_name_or_path="tiny-llama")
    assert sorted(os.path.basename(f) for f in files) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "tiny-llama"
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * len(lora_modules(model))

    fresh = tiny_model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    loaded = load_peft_adapter(fresh, str(tmp_path))
    assert loaded == sorted(lora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)


def test_peft_layout_written_by_peft_itself(tmp_path):
    """A directory laid out as PEFT documents it, with PEFT's extra config keys and the
    '.lora_A.weight' naming: loads into a model patched with the same shape."""
    from safetensors.torch import save_file

    model = patched_model()
    torch.manual_seed(3)
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, m.in_features)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"],
        "lora_dropout": 0.05, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "auto_mapping": None, "base_model_name_or_path": "x", "revision": None, "megatron_config": None,
        "layer_replication": None, "loftq_config": {}, "rank_pattern": {}, "alpha_pattern": {},
    }))
    load_peft_adapter(model, str(tmp_path))
    q = model.get_submodule("model.layers.1.self_attn.q_proj")
    assert torch.equal(q.lora_A, tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"])


def test_peft_mismatch_is_refused_and_model_untouched(tmp_path):
    model = patched_model()
    save_peft_adapter(model, str(tmp_path))
    other = patched_model(rank=2)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="r=4, alpha=16, rslora=False but .* has r=2"):
        load_peft_adapter(other, str(tmp_path))
    assert unchanged(other, snap)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only 'LORA'"):
        load_peft_adapter(other, str(tmp_path))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(tiny_model(), str(tmp_path))
