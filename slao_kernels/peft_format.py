"""LoRA adapters in PEFT's on-disk format, for PEFT and vLLM.

PEFT format (what ``peft.PeftModel.from_pretrained`` and vLLM read)::

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r × in)
                                 base_model.model.<module path>.lora_B.weight  (out × r)

The two files are one version: :func:`save_peft_adapter` writes them into a
temporary sibling directory (``.tmp-<name>.new-<hex>``), fsyncs it and swaps it
with the adapter directory in one atomic rename (``renameat2(RENAME_EXCHANGE)``
on Linux), so a reader sees the old adapter or the new one, never a mix. Other
files in the directory are carried over (hard links). Where the exchange is not
available the old directory is first renamed aside (``.tmp-<name>.old-<hex>``);
a crash in that window leaves it there, and the next save puts it back before
it starts. Every save removes the leftovers of a killed one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys

import torch
from torch import nn

from slao_kernels._files import (
    TMP_PREFIX,
    discard,
    fsync_dir,
    is_int,
    is_real,
    load_safetensors_bytes,
    read_json,
    refuse_non_finite,
    safetensors_bytes,
    write_file,
)
from slao_kernels.distributed import (
    any_rank,
    gather,
    is_main_process,
    local,
    unwrap_model,
    write_full_,
    write_on_main_process,
)

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module path in its tensor names."""


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2``);
    False where the platform or the file system cannot, and nothing was done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # this kernel or file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, new: str, written) -> None:
    """Hard-link (or copy) the entries of ``old`` into ``new``, except the files
    about to be written and the ``.tmp-*`` leftovers of killed writes."""
    for name in os.listdir(old):
        if name in written or name.startswith(TMP_PREFIX):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _sibling_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(f"{TMP_PREFIX}{name}.") + r"(new|old)-[0-9a-f]{8}")


def _recover_directory(directory: str) -> None:
    """Undo what a killed :func:`_replace_directory` left: put a directory renamed
    aside back if the directory itself is missing, and remove the other leftovers."""
    parent, name = os.path.split(directory)
    pattern = _sibling_pattern(name)
    leftovers = [os.path.join(parent, e) for e in os.listdir(parent) if pattern.fullmatch(e)]
    if not os.path.lexists(directory):
        aside = sorted((p for p in leftovers if os.path.basename(p).startswith(f"{TMP_PREFIX}{name}.old-")),
                       key=os.path.getmtime)
        if aside:  # killed between the two renames of the fallback: the old version is the current one
            os.rename(aside[-1], directory)
            leftovers.remove(aside[-1])
    for p in leftovers:
        discard(p)


def _replace_directory(directory: str, files: dict[str, bytes]) -> None:
    """Make ``directory`` hold ``files`` (name → bytes; other entries already
    there stay) as one step a reader cannot see half done (module docstring)."""
    directory = os.path.abspath(directory)
    if os.path.islink(directory):  # replace what the link points at; the link stays
        directory = os.path.realpath(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    _recover_directory(directory)
    new = os.path.join(parent, f"{TMP_PREFIX}{name}.new-{secrets.token_hex(4)}")
    os.mkdir(new)
    try:
        if os.path.isdir(directory):
            _carry_over(directory, new, files)
        for fname, data in files.items():
            write_file(os.path.join(new, fname), data)
        fsync_dir(new)
        if not os.path.lexists(directory):
            os.rename(new, directory)
        elif not _exchange(new, directory):  # fallback: two renames, with the old version set aside between
            aside = os.path.join(parent, f"{TMP_PREFIX}{name}.old-{secrets.token_hex(4)}")
            os.rename(directory, aside)
            try:
                os.rename(new, directory)
            except BaseException:
                os.rename(aside, directory)
                raise
            new = aside
        # after the exchange (or the fallback) `new` holds the previous version, or nothing
        fsync_dir(parent)
    except BaseException:
        discard(new)
        raise
    discard(new)


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
    ``LoRAConfig``, as :func:`~slao_kernels.patch_llama` makes). Checked before
    anything is written: every factor is finite, and ``directory`` is a
    directory or a new path (not a file). The two files replace the directory's
    previous adapter in one atomic step (see the module docstring); other files
    in the directory stay. In a distributed run call it on every rank: sharded
    adapters are gathered, rank 0 writes.
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
    refuse_non_finite(tensors, "save_peft_adapter")  # every rank holds the full tensors: all raise alike
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({n.rpartition(".")[2] for n in modules}), "lora_dropout": dropout,
        "bias": "none", "use_rslora": rslora, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }
    try:
        config_bytes = json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_peft_adapter: the adapter config is not plain JSON ({exc}): {config}") from exc
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_peft_adapter: directory must be a path (str or os.PathLike), "
                        f"got {type(directory).__name__}")
    directory = os.fspath(directory)
    device = local(next(iter(modules.values())).lora_A).device
    if any_rank(is_main_process() and os.path.lexists(directory) and not os.path.isdir(directory), device):
        raise ValueError(f"save_peft_adapter: {directory} exists and is not a directory "
                         "(expected a directory or a path that does not exist yet); nothing was written")
    files = [os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory, "adapter_config.json")]
    def write() -> None:
        data = safetensors_bytes(tensors, metadata={"format": "pt"})
        _replace_directory(directory, {"adapter_model.safetensors": data, "adapter_config.json": config_bytes})

    write_on_main_process(write, "save_peft_adapter", device)  # every rank hears if rank 0's write failed
    return files


def load_peft_adapter(model: nn.Module, directory: str) -> list[str]:
    """Read a PEFT-format LoRA adapter (ours, or PEFT's own output) into the model.

    If the model has no adapters yet it is patched from ``adapter_config.json``;
    otherwise the existing adapters must match it. Everything is checked before
    the model is touched. Returns the module paths loaded.
    """
    from slao_kernels.patching import LoRAConfig, lora_modules, patch_llama

    model = unwrap_model(model)
    config = read_json(os.path.join(directory, "adapter_config.json"), "PEFT adapter")
    if not isinstance(config, dict):
        raise ValueError(f"PEFT adapter: adapter_config.json must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"PEFT adapter: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"PEFT adapter: {key}=True is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("PEFT adapter: per-module rank_pattern / alpha_pattern are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapter: bias={config['bias']!r} is not supported (trained biases are not LoRA "
                         "factors); only bias='none'")
    if config.get("modules_to_save"):
        raise ValueError(f"PEFT adapter: modules_to_save={config['modules_to_save']!r} is not supported (fully "
                         "trained copies of modules); only LoRA factors are loaded")
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PEFT adapter: {path} does not exist")
    with open(path, "rb") as f:
        raw = load_safetensors_bytes(f.read(), path)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"PEFT adapter: unexpected tensor {key} (expected {PEFT_PREFIX}<module>.lora_A.weight)")
        body = key[len(PEFT_PREFIX):]
        matched = False
        for factor in ("lora_A", "lora_B"):
            for suffix in (f".{factor}.weight", f".{factor}.default.weight"):
                if body.endswith(suffix):
                    weights.setdefault(body[: -len(suffix)], {})[factor] = t
                    matched = True
        if not matched:  # a bias, an embedding factor, a saved module: loading without it would differ from PEFT
            raise ValueError(f"PEFT adapter: unexpected tensor {key} (expected {PEFT_PREFIX}<module>.lora_A.weight "
                             "or .lora_B.weight)")
    rank, alpha, rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora", False)
    if not is_int(rank) or rank < 1:
        raise ValueError(f"PEFT adapter: field 'r' of adapter_config.json must be an integer >= 1, got {rank!r}")
    if not is_real(alpha):
        raise ValueError(f"PEFT adapter: field 'lora_alpha' of adapter_config.json must be a finite number, "
                         f"got {alpha!r}")
    if not isinstance(rslora, bool):
        raise ValueError(f"PEFT adapter: field 'use_rslora' of adapter_config.json must be true or false, "
                         f"got {rslora!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"PEFT adapter: field 'lora_dropout' of adapter_config.json must be a number in [0, 1), "
                         f"got {dropout!r}")
    alpha = float(alpha)
    refuse_non_finite(raw, f"PEFT adapter {path}", "nothing was loaded")
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
                                      dropout=float(dropout)),
                    filter_fn=lambda module, fqn: fqn in weights)
        target = lora_modules(model)
    with torch.no_grad():
        for name, pair in weights.items():
            write_full_(target[name].lora_A, pair["lora_A"])  # sharded: this rank's rows
            write_full_(target[name].lora_B, pair["lora_B"])
    return sorted(weights)

