"""SLAO checkpoints: bit-identical resume, corruption, mismatch, crash safety, every malformed field
refused before the model changes, and the atomic writes under them."""

import copy
import hashlib
import json
import os

import pytest
import torch
from conftest import Crash, patched_model, run_tasks, snapshot, tree, unchanged

from slao_kernels import SLAO
from slao_kernels.patching import lora_modules

IDS = torch.randint(0, 96, (2, 8))


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



# --------------------------------------------------------------------------- issue 12: validate, then change

Q0 = "model.layers.0.self_attn.q_proj"


def canonical_digest(meta):
    """meta_sha256 as documented: SHA-256 of the sorted, compact, ASCII JSON of the other fields."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def edit_meta(ckpt, edit, resign=True):
    """Rewrite ckpt/slao.json as ``edit(meta)`` returns it; re-signed, so the field checks are what is tested."""
    path = ckpt / "slao.json"
    meta = edit(json.loads(path.read_text()))
    if resign and isinstance(meta, dict):
        meta["meta_sha256"] = canonical_digest(meta)
    path.write_text(json.dumps(meta))


def put(keys, value):
    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
        return meta
    return edit


def drop(keys):
    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
        return meta
    return edit


def saved_slao(path, tasks=(1, 2), merge="B"):
    slao = SLAO(patched_model(), merge=merge)
    run_tasks(slao, tasks)
    slao.save(str(path))
    return slao


def rewrite_tensors(ckpt, change):
    """Replace the checkpoint's tensor file by ``change(tensors)``, with matching name, sha256,
    listing and meta_sha256: a checkpoint whose checksums are all valid."""
    from safetensors.torch import load_file, save

    meta = json.loads((ckpt / "slao.json").read_text())
    tensors = change(load_file(str(ckpt / meta["tensor_file"])))
    data = save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    os.unlink(ckpt / meta["tensor_file"])
    meta["tensor_file"] = f"tensors-{digest[:16]}.safetensors"
    (ckpt / meta["tensor_file"]).write_bytes(data)
    meta["sha256"] = digest
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in tensors.items()}
    meta["meta_sha256"] = canonical_digest(meta)
    (ckpt / "slao.json").write_text(json.dumps(meta))


MALFORMED = [
    ("json-list", lambda m: [], "expected a JSON object"),
    ("json-string", lambda m: "slao", "expected a JSON object"),
    ("task_index-str", put(["task_index"], "abc"), "'task_index'"),
    ("task_index-negative", put(["task_index"], -1), "'task_index'"),
    ("task_index-fractional", put(["task_index"], 1.5), "'task_index'"),
    ("task_index-bool", put(["task_index"], True), "'task_index'"),
    ("task_index-missing", drop(["task_index"]), "task_index"),
    ("slao-str", put(["slao"], "B"), "'slao'"),
    ("slao-missing-key", drop(["slao", "merge"]), "'slao'"),
    ("lam-unknown", put(["slao", "lam"], "bogus"), "'slao.lam'"),
    ("lam-zero", put(["slao", "lam"], 0), "'slao.lam'"),
    ("lam-above-1", put(["slao", "lam"], 1.5), "'slao.lam'"),
    ("lam-bool", put(["slao", "lam"], True), "'slao.lam'"),
    ("init-unknown", put(["slao", "init"], "bogus"), "'slao.init'"),
    ("merge-unknown", put(["slao", "merge"], "C"), "'slao.merge'"),
    ("merge-list", put(["slao", "merge"], ["B"]), "'slao.merge'"),
    ("layers-list", put(["layers"], []), "'layers'"),
    ("layers-empty", put(["layers"], {}), "'layers'"),
    ("layer-str", put(["layers", Q0], "q"), Q0),
    ("layer-rank-missing", drop(["layers", Q0, "rank"]), Q0),
    ("layer-rank-str", put(["layers", Q0, "rank"], "4"), "rank must be an integer"),
    ("layer-rank-0", put(["layers", Q0, "rank"], 0), "rank must be an integer"),
    ("layer-rank-other", put(["layers", Q0, "rank"], 2), f"tensor {Q0}.lora_A must be \\[2, 64\\]"),
    ("layer-alpha-str", put(["layers", Q0, "alpha"], "16"), "alpha must be a finite number"),
    ("layer-rslora-str", put(["layers", Q0, "rslora"], "no"), "rslora must be true or false"),
    ("layer-dtype", put(["layers", Q0, "dtype"], "int8"), "dtype must be one of"),
    ("version-missing", drop(["library_version"]), "missing \\['library_version'\\]"),
    ("version-int", put(["library_version"], 1), "'library_version'"),
    ("unknown-field", put(["extra"], 1), "unknown \\['extra'\\]"),
    ("metadata-list", put(["metadata"], [1]), "'metadata'"),
    ("strategy-checkpoint", put(["strategy"], "seqlora"), "strategy 'seqlora'"),
    ("merge-AB-lacks-buffer_A", put(["slao", "merge"], "AB"), "missing \\['model.*buffer_A"),
    ("task-0-has-no-buffers", put(["task_index"], 0), "unexpected \\['model.*buffer_B"),
    ("tensor_file-outside", put(["tensor_file"], "../other/x.safetensors"), "'tensor_file'"),
    ("tensor_file-int", put(["tensor_file"], 3), "'tensor_file'"),
    ("sha256-not-hex", put(["sha256"], "zz"), "'sha256'"),
    ("tensors-str", put(["tensors"], "x"), "'tensors'"),
    ("tensor-spec-shape-str", put(["tensors", f"{Q0}.lora_A", "shape"], "4x64"), f"tensors\\['{Q0}.lora_A'\\]"),
    ("format-unknown", put(["format"], "slao_kernels.slao/9"), "found format"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_metadata_is_refused_naming_the_field_and_model_untouched(tmp_path, edit, match):
    saved_slao(tmp_path)
    edit_meta(tmp_path, edit)
    target = patched_model()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=match):  # never KeyError/TypeError/AttributeError
        SLAO.load(target, str(tmp_path))
    assert unchanged(target, snap)


def test_hand_edited_json_is_refused_as_corrupted(tmp_path):
    saved_slao(tmp_path)
    edit_meta(tmp_path, put(["task_index"], 5), resign=False)
    target = patched_model()
    snap = snapshot(target)
    with pytest.raises(ValueError, match="corrupted or was edited: field 'meta_sha256'"):
        SLAO.load(target, str(tmp_path))
    assert unchanged(target, snap)


def test_tensor_file_must_lie_inside_the_checkpoint_directory(tmp_path):
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    saved_slao(ckpt)
    other.mkdir()
    name = json.loads((ckpt / "slao.json").read_text())["tensor_file"]
    os.replace(ckpt / name, other / name)  # a valid tensor file, but outside
    target = patched_model()
    snap = snapshot(target)
    edit_meta(ckpt, put(["tensor_file"], f"../other/{name}"))
    with pytest.raises(ValueError, match="field 'tensor_file' must be a plain file name"):
        SLAO.load(target, str(ckpt))
    edit_meta(ckpt, put(["tensor_file"], name))
    os.symlink(other / name, ckpt / name)  # the right name, but a link out of the directory
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        SLAO.load(target, str(ckpt))
    assert unchanged(target, snap)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_checkpoint_tensors_are_refused_on_load(tmp_path, value):
    saved_slao(tmp_path)

    def poison(tensors):
        tensors[f"{Q0}.buffer_B"][0, 0] = value
        return tensors

    rewrite_tensors(tmp_path, poison)
    target = patched_model()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=f"\\['{Q0}.buffer_B'\\] hold NaN or infinity; nothing was loaded"):
        SLAO.load(target, str(tmp_path))
    assert unchanged(target, snap)


def test_a_missing_buffer_is_refused_even_when_the_checksums_match(tmp_path):
    saved_slao(tmp_path)
    rewrite_tensors(tmp_path, lambda t: {k: v for k, v in t.items() if k != f"{Q0}.buffer_B"})
    target = patched_model()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=f"missing \\['{Q0}.buffer_B'\\]"):
        SLAO.load(target, str(tmp_path))
    assert unchanged(target, snap)


def test_checkpoint_format_1_still_loads(tmp_path):
    slao = saved_slao(tmp_path, merge="AB")
    edit_meta(tmp_path, lambda m: {**{k: v for k, v in m.items() if k != "meta_sha256"},
                                   "format": "slao_kernels.slao/1"}, resign=False)
    target = patched_model()
    loaded = SLAO.load(target, str(tmp_path))
    assert (loaded.task_index, loaded.merge) == (2, "AB")
    for n, m in lora_modules(target).items():
        assert torch.equal(m.lora_A, slao.modules[n].lora_A) and torch.equal(m.lora_B, slao.modules[n].lora_B)
        assert torch.equal(loaded._b_other[n], slao._b_other[n]) and torch.equal(loaded._a_other[n], slao._a_other[n])


def test_caller_metadata_round_trips_and_is_covered_by_the_checksum(tmp_path):
    from slao_kernels.continual.checkpoint import load_checkpoint

    slao = SLAO(patched_model())
    run_tasks(slao, [1])
    slao.save(str(tmp_path), metadata={"run": {"tasks": ["a", "b"], "done": 1}})
    assert load_checkpoint(str(tmp_path))[0]["metadata"] == {"run": {"tasks": ["a", "b"], "done": 1}}
    assert SLAO.load(patched_model(), str(tmp_path)).task_index == 1
    edit_meta(tmp_path, put(["metadata", "run", "done"], 2), resign=False)
    with pytest.raises(ValueError, match="corrupted or was edited"):
        load_checkpoint(str(tmp_path))


def test_slao_save_refuses_non_finite_tensors_and_writes_nothing(tmp_path):
    slao = saved_slao(tmp_path, tasks=[1])
    before = tree(tmp_path)
    run_tasks(slao, [2])
    with torch.no_grad():
        slao.modules[Q0].lora_A[1, 2] = float("nan")  # after end_task: only save() can catch it now
    with pytest.raises(ValueError, match=f"SLAO.save: expected finite tensors, but \\['{Q0}.lora_A'\\]"):
        slao.save(str(tmp_path))
    assert tree(tmp_path) == before
    with pytest.raises(ValueError, match="hold NaN or infinity"):
        slao.save(str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()


def test_strategy_checkpoints_refuse_non_finite_tensors(tmp_path):
    from slao_kernels.continual.checkpoint import save_checkpoint
    from slao_kernels.continual.strategies import SeqLoRA

    with pytest.raises(ValueError, match=r"save_checkpoint: expected finite tensors, but \['w'\]"):
        save_checkpoint(str(tmp_path / "a"), {"v": torch.ones(2), "w": torch.tensor([1.0, float("-inf")])},
                        {"strategy": "x"})
    strategy = SeqLoRA(patched_model())
    with torch.no_grad():
        strategy.modules[Q0].lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match=f"\\['{Q0}.lora_B'\\] hold NaN or infinity"):
        strategy.save(str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with torch.no_grad():
        strategy.modules[Q0].lora_B.zero_()
    strategy.save(str(tmp_path / "b"))  # the other strategies' checkpoints still round-trip
    fresh = SeqLoRA(patched_model())
    fresh.load(str(tmp_path / "b"))
    assert torch.equal(fresh.modules[Q0].lora_A, strategy.modules[Q0].lora_A)


def test_checkpoint_save_removes_leftovers_of_a_killed_write(tmp_path):
    slao = saved_slao(tmp_path, tasks=[1])
    (tmp_path / ".tmp-k1ll3d").write_bytes(b"\0" * (1 << 20))  # what mkstemp's file looks like after a SIGKILL
    (tmp_path / ".tmp-k1ll3d.d").mkdir()
    run_tasks(slao, [2])
    slao.save(str(tmp_path))
    tensor_file = json.loads((tmp_path / "slao.json").read_text())["tensor_file"]
    assert sorted(os.listdir(tmp_path)) == ["slao.json", tensor_file]


def test_save_checkpoint_validates_its_arguments_before_writing(tmp_path):
    from slao_kernels.continual.checkpoint import save_checkpoint

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_checkpoint(str(tmp_path / "file"), {"w": torch.ones(1)}, {})
    with pytest.raises(ValueError, match=r"must not set \['format'\]"):
        save_checkpoint(str(tmp_path / "d"), {"w": torch.ones(1)}, {"format": "mine"})
    with pytest.raises(ValueError, match="meta must be plain JSON"):
        save_checkpoint(str(tmp_path / "d"), {"w": torch.ones(1)}, {"x": float("nan")})
    with pytest.raises(TypeError, match=r"tensors\['w'\] must be a torch.Tensor"):
        save_checkpoint(str(tmp_path / "d"), {"w": [1.0]}, {})
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "d").exists()




def test_write_atomic_removes_what_a_killed_write_of_the_same_file_left(tmp_path, monkeypatch):
    import slao_kernels._files as files

    (tmp_path / "report.json").write_text("old")
    with monkeypatch.context() as m:  # killed between the fsync and the rename: no cleanup runs
        m.setattr(files, "discard", lambda path: None)
        m.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(Crash("killed")))
        with pytest.raises(Crash):
            files.write_json_atomic(str(tmp_path / "report.json"), {"new": 1})
    left = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert len(left) == 1 and (tmp_path / "report.json").read_text() == "old"
    (tmp_path / ".tmp-other.json.0123abcd").write_text("another file's")  # not ours to remove
    files.write_json_atomic(str(tmp_path / "report.json"), {"new": 2})
    assert sorted(os.listdir(tmp_path)) == [".tmp-other.json.0123abcd", "report.json"]
    assert json.loads((tmp_path / "report.json").read_text()) == {"new": 2}
    assert oct((tmp_path / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
