"""Adapter state on disk: SLAO checkpoints and PEFT-format adapters.

SLAO checkpoint (a directory)::

    slao.json                    format, library version, task index, SLAO and LoRA config,
                                 every module's tensor shapes and dtypes, the tensor file's
                                 name and SHA-256
    tensors-<sha8>.safetensors   <module>.lora_A / .lora_B (the adapter in the model) and
                                 <module>.buffer_B / .buffer_A (the controller's buffers)

Writes are crash-safe: the tensor file is written under a temporary name,
fsynced and renamed to its content-addressed name; then ``slao.json`` is
replaced the same way. The JSON replacement is the commit: a crash before it
leaves the previous checkpoint intact, and a stale tensor file is removed
after it. Loading verifies the checksum and every shape before it touches the
model.

PEFT format (what ``peft.PeftModel.from_pretrained`` and vLLM read)::

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r × in)
                                 base_model.model.<module path>.lora_B.weight  (out × r)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from torch import nn

from slao_kernels.distributed import barrier, gather, is_main_process, unwrap_model, write_full_

CHECKPOINT_FORMAT = "slao_kernels.slao/1"
PEFT_PREFIX = "base_model.model."


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and restore it
    os.umask(mask)
    return mask


def write_atomic(path: str, write) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary file in the same
    directory, fsync, then rename over ``path``: readers see the old or the new
    file, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, payload) -> None:
    """Write ``payload`` as indented JSON to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _load_safetensors_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{what} is not a readable safetensors file ({exc})") from exc


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from exc


# --------------------------------------------------------------------------- SLAO checkpoints


def save_checkpoint(directory: str, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write a checkpoint (see the module docstring); returns the path of its JSON."""
    data = _safetensors_bytes(tensors)
    digest = hashlib.sha256(data).hexdigest()
    tensor_file = f"tensors-{digest[:16]}.safetensors"
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, tensor_file), lambda f: f.write(data))
    meta = {**meta, "format": CHECKPOINT_FORMAT, "tensor_file": tensor_file, "sha256": digest,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in tensors.items()}}
    json_path = os.path.join(directory, "slao.json")
    write_atomic(json_path, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))
    for name in os.listdir(directory):  # tensor files of earlier saves
        if name.startswith("tensors-") and name.endswith(".safetensors") and name != tensor_file:
            os.unlink(os.path.join(directory, name))
    return json_path


def load_checkpoint(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint, verified against its checksum and listed shapes."""
    meta = _read_json(os.path.join(directory, "slao.json"), "SLAO checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory} is not a SLAO checkpoint of format {CHECKPOINT_FORMAT} "
                         f"(found format {meta.get('format')!r})")
    path = os.path.join(directory, meta["tensor_file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SLAO checkpoint: {path}, named by slao.json, does not exist")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"SLAO checkpoint: {path} is corrupted or truncated (SHA-256 does not match slao.json)")
    tensors = _load_safetensors_bytes(data, path)
    for key, spec in meta["tensors"].items():
        t = tensors.get(key)
        if t is None or list(t.shape) != spec["shape"] or str(t.dtype).replace("torch.", "") != spec["dtype"]:
            raise ValueError(f"SLAO checkpoint: tensor {key} is missing or differs from slao.json")
    return meta, tensors


# --------------------------------------------------------------------------- PEFT format


def _lora_modules(model: nn.Module):
    from slao_kernels.patching import lora_modules

    modules = lora_modules(unwrap_model(model))
    if not modules:
        raise ValueError("the model has no LoRA adapters: call slao_kernels.patch_llama(model, config) first")
    return modules


def save_peft_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None) -> list[str]:
    """Write the model's adapter (as it is now: after ``SLAO.end_task()``, the
    merged one) in PEFT's on-disk format; returns the files written.

    All adapted modules must share rank, alpha, rsLoRA and dropout (a single
    ``LoRAConfig``, as :func:`~slao_kernels.patch_llama` makes). In a distributed
    run call it on every rank: sharded adapters are gathered, rank 0 writes.
    """
    modules = _lora_modules(model)
    shapes = {(m.rank, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0)) for m in modules.values()}
    if len(shapes) != 1:
        raise ValueError(f"save_peft_adapter: the adapters differ in (rank, alpha, rslora, dropout): {sorted(shapes)}")
    rank, alpha, rslora, dropout = shapes.pop()
    merged = [n for n, m in modules.items() if m.merged]
    if merged:
        raise ValueError(f"save_peft_adapter: {merged[:3]} are merged into their base weights; unmerge() first")
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = gather(m.lora_A)  # a collective when sharded
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = gather(m.lora_B)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({n.rpartition(".")[2] for n in modules}), "lora_dropout": dropout,
        "bias": "none", "use_rslora": rslora, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }
    files = [os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory, "adapter_config.json")]
    if is_main_process():
        data = _safetensors_bytes(tensors, metadata={"format": "pt"})
        write_atomic(files[0], lambda f: f.write(data))
        write_atomic(files[1], lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode()))
    barrier()
    return files


def load_peft_adapter(model: nn.Module, directory: str) -> list[str]:
    """Read a PEFT-format LoRA adapter (ours, or PEFT's own output) into the model.

    If the model has no adapters yet it is patched from ``adapter_config.json``;
    otherwise the existing adapters must match it. Everything is checked before
    the model is touched. Returns the module paths loaded.
    """
    from slao_kernels.patching import LoRAConfig, lora_modules, patch_llama

    model = unwrap_model(model)
    config = _read_json(os.path.join(directory, "adapter_config.json"), "PEFT adapter")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"PEFT adapter: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"PEFT adapter: {key}=True is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("PEFT adapter: per-module rank_pattern / alpha_pattern are not supported")
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PEFT adapter: {path} does not exist")
    with open(path, "rb") as f:
        raw = _load_safetensors_bytes(f.read(), path)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"PEFT adapter: unexpected tensor {key} (expected {PEFT_PREFIX}<module>.lora_A.weight)")
        body = key[len(PEFT_PREFIX):]
        for factor in ("lora_A", "lora_B"):
            for suffix in (f".{factor}.weight", f".{factor}.default.weight"):
                if body.endswith(suffix):
                    weights.setdefault(body[: -len(suffix)], {})[factor] = t
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))
    existing = lora_modules(model)
    if existing:
        target = existing
    else:
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = sorted(set(weights) - linears)
        if missing:
            raise ValueError(f"PEFT adapter: modules {missing[:3]} are not linear layers of the model")
        target = None
    names = set(target) if target is not None else set(weights)
    if set(weights) != names:
        raise ValueError(f"PEFT adapter: its modules differ from the model's adapters "
                         f"(only in the file: {sorted(set(weights) - names)[:3]}, "
                         f"only in the model: {sorted(names - set(weights))[:3]})")
    for name, pair in weights.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"PEFT adapter: {name} lacks {sorted({'lora_A', 'lora_B'} - set(pair))}")
        lin = model.get_submodule(name)
        want_a, want_b = (rank, lin.in_features), (lin.out_features, rank)
        if tuple(pair["lora_A"].shape) != want_a or tuple(pair["lora_B"].shape) != want_b:
            raise ValueError(f"PEFT adapter: {name} has lora_A {tuple(pair['lora_A'].shape)} and lora_B "
                             f"{tuple(pair['lora_B'].shape)}; the model needs {want_a} and {want_b}")
        if target is not None and (target[name].rank, target[name].alpha, target[name].rslora) != (rank, alpha, rslora):
            m = target[name]
            raise ValueError(f"PEFT adapter: r={rank}, alpha={alpha:g}, rslora={rslora} but {name} has "
                             f"r={m.rank}, alpha={m.alpha:g}, rslora={m.rslora}")
    if target is None:
        leaves = tuple(sorted({n.rpartition(".")[2] for n in weights}))
        patch_llama(model, LoRAConfig(rank=rank, alpha=alpha, targets=leaves, rslora=rslora,
                                      dropout=float(config.get("lora_dropout", 0.0))),
                    filter_fn=lambda module, fqn: fqn in weights)
        target = lora_modules(model)
    with torch.no_grad():
        for name, pair in weights.items():
            write_full_(target[name].lora_A, pair["lora_A"])  # sharded: this rank's rows
            write_full_(target[name].lora_B, pair["lora_B"])
    return sorted(weights)
