"""PEFT-format adapters: round trip, PEFT's documented layout, mismatch, and saves that leave the old
adapter or the new one, never a mix."""

import json
import os
import shutil

import pytest
import torch
from conftest import Crash, patched_model, run_tasks, snapshot, tiny_model, tree, unchanged

from slao_kernels import SLAO, LoRAConfig, load_peft_adapter, patch_llama, save_peft_adapter
from slao_kernels.patching import lora_modules

IDS = torch.randint(0, 96, (2, 8))


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


# --------------------------------------------------------------------------- PEFT saves: old or new, never a mix


def peft_pair(seed_old=1, seed_new=2):
    """Two adapters of one shape that differ in weights and in alpha (so a torn save is visible)."""
    old, new = tiny_model(), tiny_model()
    patch_llama(old, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    patch_llama(new, LoRAConfig(rank=4, alpha=32.0, targets=("q_proj", "v_proj")))
    for model, seed in ((old, seed_old), (new, seed_new)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    return old, new


def crash_at(monkeypatch, step, kill):
    """Raise Crash at the ``step``-th file-system step of a save (0-based); with ``kill``, the
    process 'dies' there: no cleanup runs (discard does nothing). Returns the step counter."""
    import slao_kernels._files as files
    import slao_kernels.peft_format as pf

    count = [0]

    def hook(real):
        def f(*args, **kwargs):
            count[0] += 1
            if count[0] - 1 == step:
                raise Crash(f"step {step}")
            return real(*args, **kwargs)
        return f

    for mod, name in ((os, "replace"), (os, "rename"), (os, "link"), (os, "mkdir"), (pf, "write_file"),
                      (pf, "_exchange"), (pf, "fsync_dir"), (files, "fsync_dir")):
        real = getattr(mod, name, None)
        if real is not None:
            monkeypatch.setattr(mod, name, hook(real))
    if kill:
        for mod in (files, pf):  # both hold the name: pf imported it from files
            monkeypatch.setattr(mod, "discard", lambda path: None)
    return count


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("kill", [False, True], ids=["exception", "killed"])
def test_peft_save_crashing_at_every_step_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, kill, exchange):
    import slao_kernels.peft_format as pf

    old, new = peft_pair()
    ref = tmp_path / "ref"
    save_peft_adapter(new, str(ref))
    adapter = tmp_path / "runs" / "adapter"
    outcomes = []
    for step in range(50):
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        save_peft_adapter(old, str(adapter))
        (adapter / "README.md").write_text("mine")  # a file of the user's: kept by every save
        old_files, new_files = tree(adapter), {**tree(ref), "README.md": b"mine"}
        with monkeypatch.context() as m:
            if not exchange:
                m.setattr(pf, "_exchange", lambda a, b: False)
            count = crash_at(m, step, kill)
            try:
                save_peft_adapter(new, str(adapter))
                finished = True
            except Crash:
                finished = False
        now = tree(adapter) if adapter.is_dir() else None
        if now is None:  # only between the two renames of the fallback, and only when killed
            assert not exchange and kill, f"step {step}: the adapter directory vanished"
            aside = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".tmp-adapter.old-")]
            assert len(aside) == 1 and tree(aside[0]) == old_files, f"step {step}: the old adapter is lost"
        else:
            assert now in (old_files, new_files), f"step {step}: a mix of the old and the new adapter: {sorted(now)}"
            if not finished:
                outcomes.append("new" if now == new_files else "old")
        if not kill:  # an exception cleans up after itself
            assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".tmp-")], f"step {step}"
        save_peft_adapter(new, str(adapter))  # the next save completes and removes every leftover
        assert tree(adapter) == new_files and os.listdir(tmp_path / "runs") == ["adapter"], f"step {step}"
        if finished:
            break
    assert finished and count[0] >= 4, "the save never got past the crash points"
    assert "old" in outcomes and "new" in outcomes  # crashes before the commit point and after it were both hit


def test_peft_save_onto_a_file_is_refused_before_writing(tmp_path):
    old, _ = peft_pair()
    target = tmp_path / "adapter"
    target.write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_peft_adapter(old, str(target))
    assert target.read_text() == "not a directory" and os.listdir(tmp_path) == ["adapter"]


def test_peft_save_removes_leftovers_of_killed_saves(tmp_path):
    old, new = peft_pair()
    adapter = tmp_path / "adapter"
    save_peft_adapter(old, str(adapter))
    (adapter / ".tmp-x8y7z6").write_bytes(b"\0" * (1 << 20))  # a killed per-file write of an earlier version
    (tmp_path / ".tmp-adapter.new-0123abcd").mkdir()  # a killed directory save
    (tmp_path / ".tmp-adapter.new-0123abcd" / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".tmp-other.new-0123abcd").mkdir()  # another directory's: not ours to remove
    save_peft_adapter(new, str(adapter))
    assert sorted(os.listdir(tmp_path)) == [".tmp-other.new-0123abcd", "adapter"]
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] == 32.0


def test_peft_save_refuses_non_finite_factors_and_writes_nothing(tmp_path):
    old, new = peft_pair()
    adapter = tmp_path / "adapter"
    save_peft_adapter(old, str(adapter))
    before = tree(adapter)
    with torch.no_grad():
        new.get_submodule("model.layers.1.self_attn.v_proj").lora_A[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"save_peft_adapter: expected finite tensors, but "
                                         r"\['base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight'\]"):
        save_peft_adapter(new, str(adapter))
    assert tree(adapter) == before and os.listdir(tmp_path) == ["adapter"]


def test_peft_save_through_a_symlink_replaces_its_target(tmp_path):
    old, new = peft_pair()
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    save_peft_adapter(old, str(tmp_path / "link"))
    save_peft_adapter(new, str(tmp_path / "link"))
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert json.loads((tmp_path / "real" / "adapter_config.json").read_text())["lora_alpha"] == 32.0


@pytest.mark.parametrize("edit,match", [
    (lambda c: [], "must hold a JSON object"),
    (lambda c: {**c, "r": "4"}, "field 'r'"),
    (lambda c: {**c, "lora_alpha": None}, "field 'lora_alpha'"),
    (lambda c: {**c, "use_rslora": "no"}, "field 'use_rslora'"),
    (lambda c: {**c, "lora_dropout": 1.5}, "field 'lora_dropout'"),
    (lambda c: {**c, "bias": "lora_only"}, "bias='lora_only' is not supported"),
    (lambda c: {**c, "modules_to_save": ["lm_head"]}, "modules_to_save=\\['lm_head'\\] is not supported"),
])
def test_malformed_peft_config_is_refused_naming_the_field(tmp_path, edit, match):
    old, _ = peft_pair()
    save_peft_adapter(old, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(edit(config)))
    fresh = tiny_model()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(fresh, str(tmp_path))
    assert unchanged(fresh, snap) and not lora_modules(fresh)


def test_a_tensor_that_is_no_lora_factor_is_refused_not_dropped(tmp_path):
    """The reported bug: tensors other than lora_A / lora_B (a trained lora_B bias, as PEFT writes with
    bias='lora_only'; an embedding factor) were skipped silently, so the model loaded differed from PEFT's."""
    from safetensors.torch import load_file, save_file

    old, _ = peft_pair()
    save_peft_adapter(old, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    save_file({**tensors, key: torch.ones(tensors[key.replace(".bias", ".weight")].shape[0])}, path)
    fresh = tiny_model()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=f"unexpected tensor {key}"):
        load_peft_adapter(fresh, str(tmp_path))
    assert unchanged(fresh, snap) and not lora_modules(fresh)
