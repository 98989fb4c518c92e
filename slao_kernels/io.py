"""Adapter state on disk: SLAO checkpoints and PEFT-format adapters.

SLAO checkpoint (a directory)::

    slao.json                    format, library version, task index, SLAO and LoRA config,
                                 every module's tensor shapes and dtypes, the tensor file's
                                 name and SHA-256, and ``meta_sha256``: the SHA-256 of the
                                 canonical JSON of everything else in slao.json
    tensors-<sha16>.safetensors  <module>.lora_A / .lora_B (the adapter in the model) and
                                 <module>.buffer_B / .buffer_A (the controller's buffers)

Writes are crash-safe: the tensor file is written under a temporary name,
fsynced and renamed to its content-addressed name; then ``slao.json`` is
replaced the same way. The JSON replacement is the commit: a crash before it
leaves the previous checkpoint intact, and a stale tensor file is removed
after it; the ``.tmp-*`` files of a killed write are removed by the next save.
Nothing is written unless every tensor is finite and the metadata is JSON.

Loading verifies both checksums (so a hand-edited or truncated ``slao.json``
is refused as corrupted), that ``tensor_file`` is a plain file name inside the
checkpoint directory, every listed shape and dtype, and that every tensor is
finite, before it returns anything. :func:`validate_slao_meta` checks the
SLAO-specific part (task index, λ schedule, init, merge, layers, and exactly
the tensors that state needs); :meth:`slao_kernels.SLAO.load` runs it before it
touches the model. Format ``slao_kernels.slao/1`` (no ``meta_sha256``) still loads.

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
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys

import torch
from torch import nn

from slao_kernels.distributed import any_rank, barrier, gather, is_main_process, local, unwrap_model, write_full_

CHECKPOINT_FORMAT = "slao_kernels.slao/2"
"""The format :func:`save_checkpoint` writes (``/2``: slao.json carries ``meta_sha256``)."""
READABLE_FORMATS = ("slao_kernels.slao/1", CHECKPOINT_FORMAT)
"""The formats :func:`load_checkpoint` reads (``/1``: as ``/2`` without the JSON checksum)."""
META_CHECKSUM = "meta_sha256"
"""The slao.json field holding the SHA-256 of the canonical JSON of all its other fields."""
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module path in its tensor names."""
TMP_PREFIX = ".tmp-"
"""Prefix of every temporary file or directory a write makes; a killed write leaves them."""

_WRITTEN_KEYS = ("format", "tensor_file", "sha256", "tensors", META_CHECKSUM)  # added by save_checkpoint
_TENSOR_FILE = re.compile(r"tensors-[0-9a-f]{16}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ADAPTER_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: str) -> None:
    """Remove a temporary file or directory if it is there (a symlink itself, never its target)."""
    if os.path.islink(path) or os.path.isfile(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def _write_file(path: str, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, fsynced, with the usual permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(base: str) -> str:
    return f"{TMP_PREFIX}{base[:200]}."  # + 8 hex digits; [:200] keeps the name under NAME_MAX


def write_atomic(path: str, write) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary file in the same
    directory (``.tmp-<name>.<8 hex>``), fsync, then rename over ``path``: readers
    see the old or the new file, never a partial one. The temporary files that an
    earlier, killed write of ``path`` left are removed first."""
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stale = re.compile(re.escape(_temporary_name(base)) + r"[0-9a-f]{8}")
    for name in os.listdir(directory):
        if stale.fullmatch(name):
            _discard(os.path.join(directory, name))
    while True:
        tmp = os.path.join(directory, _temporary_name(base) + secrets.token_hex(4))
        try:  # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() gives
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        _discard(tmp)
        raise


def write_json_atomic(path: str, payload) -> None:
    """Write ``payload`` as indented JSON to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str, consequence: str = "nothing was written") -> None:
    """Raise ``ValueError`` naming every floating-point tensor of ``tensors`` that holds NaN or ±inf."""
    bad = [k for k, t in tensors.items()
           if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{what}: expected finite tensors, but {bad[:5]}{more} hold NaN or infinity; {consequence}")


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _load_safetensors_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{what} is not a readable safetensors file ({exc})") from exc


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _read_json(path: str, what: str, strict: bool = False):
    """Parse the JSON file ``path``; ``strict`` also refuses NaN/Infinity and duplicate keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    hooks = dict(object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant) if strict else {}
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"), **hooks)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from exc


def _canonical_json(payload) -> bytes:
    """The one byte string a JSON value hashes as: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _meta_digest(meta: dict) -> str:
    return hashlib.sha256(_canonical_json({k: v for k, v in meta.items() if k != META_CHECKSUM})).hexdigest()


def _remove_leftovers(directory: str) -> None:
    """Remove the ``.tmp-*`` files a killed write left in ``directory``."""
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            _discard(os.path.join(directory, name))


def _check_directory_target(directory, what: str) -> None:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{what}: directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{what}: {os.fspath(directory)} exists and is not a directory "
                         "(expected a directory or a path that does not exist yet)")


# --------------------------------------------------------------------------- SLAO checkpoints


def save_checkpoint(directory: str, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write a checkpoint (see the module docstring); returns the path of its JSON.

    ``meta`` is any JSON object without the keys this function adds (``format``,
    ``tensor_file``, ``sha256``, ``tensors``, ``meta_sha256``). Everything is
    checked first (a ``TypeError``/``ValueError`` naming the argument, nothing
    written): ``directory`` is a directory or a new path, every tensor is finite,
    ``meta`` is JSON. The ``.tmp-*`` files of an earlier, killed save are removed.
    """
    what = "save_checkpoint"
    if not isinstance(meta, dict):
        raise TypeError(f"{what}: meta must be a dict, got {type(meta).__name__}")
    reserved = sorted(set(meta) & set(_WRITTEN_KEYS))
    if reserved:
        raise ValueError(f"{what}: meta must not set {reserved}: save_checkpoint writes those keys itself")
    if not isinstance(tensors, dict):
        raise TypeError(f"{what}: tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    for k, v in tensors.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"{what}: tensor names must be non-empty str, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}: tensors[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
    refuse_non_finite(tensors, what)
    _check_directory_target(directory, what)
    directory = os.fspath(directory)
    data = _safetensors_bytes(tensors)
    digest = hashlib.sha256(data).hexdigest()
    tensor_file = f"tensors-{digest[:16]}.safetensors"
    full = {**meta, "format": CHECKPOINT_FORMAT, "tensor_file": tensor_file, "sha256": digest,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in tensors.items()}}
    try:  # the round trip makes the digest the one a reader recomputes (tuples, key types)
        full = json.loads(_canonical_json(full))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: meta must be plain JSON (str keys, finite numbers), got {meta!r} ({exc})") from exc
    full[META_CHECKSUM] = _meta_digest(full)
    text = json.dumps(full, indent=1, sort_keys=True, allow_nan=False).encode()
    os.makedirs(directory, exist_ok=True)
    _remove_leftovers(directory)
    write_atomic(os.path.join(directory, tensor_file), lambda f: f.write(data))
    json_path = os.path.join(directory, "slao.json")
    write_atomic(json_path, lambda f: f.write(text))  # the commit
    for name in os.listdir(directory):  # tensor files of earlier saves
        if name.startswith("tensors-") and name.endswith(".safetensors") and name != tensor_file:
            os.unlink(os.path.join(directory, name))
    return json_path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_checkpoint(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint, verified before anything is returned.

    Checked: ``slao.json`` is a JSON object of a readable format whose
    ``meta_sha256`` matches its content; ``tensor_file`` is a plain file name in
    ``directory`` whose SHA-256 matches; the file holds exactly the listed
    tensors, with the listed shapes and dtypes, all finite. Any failure raises
    ``ValueError`` naming the field (``FileNotFoundError`` for missing files).
    The SLAO-specific fields are checked by :func:`validate_slao_meta`.
    """
    json_path = os.path.join(directory, "slao.json")
    where = f"SLAO checkpoint {json_path}"
    meta = _read_json(json_path, "SLAO checkpoint", strict=True)
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__} {meta!r:.80}")
    fmt = meta.get("format")
    if fmt not in READABLE_FORMATS:
        raise ValueError(f"{directory} is not a SLAO checkpoint of format {CHECKPOINT_FORMAT} "
                         f"(readable: {list(READABLE_FORMATS)}; found format {fmt!r})")
    if fmt == CHECKPOINT_FORMAT and meta.get(META_CHECKSUM) != _meta_digest(meta):
        raise ValueError(f"{where} is corrupted or was edited: field {META_CHECKSUM!r} "
                         f"({meta.get(META_CHECKSUM)!r:.20}…) does not match the SHA-256 of the rest of the file")
    tensor_file, digest, specs = meta.get("tensor_file"), meta.get("sha256"), meta.get("tensors")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ValueError(f"{where}: field 'sha256' must be 64 lowercase hex digits, got {digest!r}")
    if not isinstance(tensor_file, str) or not _TENSOR_FILE.fullmatch(tensor_file):
        raise ValueError(f"{where}: field 'tensor_file' must be a plain file name 'tensors-<16 hex>.safetensors' "
                         f"inside the checkpoint directory, got {tensor_file!r}")
    if tensor_file != f"tensors-{digest[:16]}.safetensors":
        raise ValueError(f"{where}: field 'tensor_file' {tensor_file!r} does not match field 'sha256' "
                         f"(expected tensors-{digest[:16]}.safetensors)")
    if not isinstance(specs, dict):
        raise ValueError(f"{where}: field 'tensors' must be an object of name -> {{shape, dtype}}, "
                         f"got {type(specs).__name__}")
    for key, spec in specs.items():
        if not (isinstance(spec, dict) and set(spec) == {"shape", "dtype"} and isinstance(spec["dtype"], str)
                and isinstance(spec["shape"], list) and all(_is_int(d) and d >= 0 for d in spec["shape"])):
            raise ValueError(f"{where}: field tensors[{key!r}] must be {{'shape': [int >= 0, ...], 'dtype': str}}, "
                             f"got {spec!r}")
    path = os.path.join(directory, tensor_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SLAO checkpoint: {path}, named by slao.json, does not exist")
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory):
        raise ValueError(f"{where}: field 'tensor_file' {tensor_file!r} resolves to {os.path.realpath(path)}, "
                         f"outside the checkpoint directory {os.path.realpath(directory)}")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"SLAO checkpoint: {path} is corrupted or truncated (SHA-256 does not match slao.json)")
    tensors = _load_safetensors_bytes(data, path)
    if set(tensors) != set(specs):
        raise ValueError(f"{where}: the tensor file holds other tensors than field 'tensors' lists "
                         f"(only in the file: {sorted(set(tensors) - set(specs))[:3]}, "
                         f"only in slao.json: {sorted(set(specs) - set(tensors))[:3]})")
    for key, spec in specs.items():
        t = tensors[key]
        if list(t.shape) != spec["shape"] or str(t.dtype).replace("torch.", "") != spec["dtype"]:
            raise ValueError(f"SLAO checkpoint: tensor {key} is {list(t.shape)} {t.dtype} in the file, slao.json "
                             f"lists {spec['shape']} {spec['dtype']}")
    refuse_non_finite(tensors, f"SLAO checkpoint {path}", "nothing was loaded")
    return meta, tensors


def validate_slao_meta(meta, tensors: dict[str, torch.Tensor] | None = None, where: str = "SLAO checkpoint") -> dict:
    """Check the SLAO part of a checkpoint's metadata, and that ``tensors`` (when
    given) are exactly the tensors that state needs, with their shapes and dtypes.

    Fields: ``library_version`` (str), ``task_index`` (int ≥ 0), ``slao``
    (``lam`` in :data:`~slao_kernels.continual.slao.LAMBDAS` or a number in
    (0, 1], ``init`` in ``INITS``, ``merge`` in ``MERGES``) and ``layers`` (per
    module: ``rank``/``in``/``out`` ints ≥ 1, finite ``alpha``, bool ``rslora``,
    ``dtype``). Tensors per layer: ``lora_A`` (rank×in), ``lora_B`` (out×rank),
    ``buffer_B`` (out×rank) once a task has ended (``task_index ≥ 1``), and
    ``buffer_A`` (rank×in) then too when ``merge`` is "A" or "AB"; nothing else.
    Raises ``ValueError`` naming the field; returns ``{"task_index", "lam",
    "init", "merge", "layers"}``.
    """
    from slao_kernels.continual.slao import INITS, LAMBDAS, MERGES

    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__} {meta!r:.80}")
    if "strategy" in meta:
        raise ValueError(f"{where}: holds a checkpoint of strategy {meta['strategy']!r}, not of SLAO")
    fields = ("library_version", "task_index", "slao", "layers")
    missing = [k for k in fields if k not in meta]
    unknown = sorted(set(meta) - set(fields) - set(_WRITTEN_KEYS) - {"metadata"})
    if missing or unknown:
        raise ValueError(f"{where}: expected the fields {list(fields)}; missing {missing}, unknown {unknown}")
    if "metadata" in meta and not isinstance(meta["metadata"], dict):  # the caller's record (SLAO.save)
        raise ValueError(f"{where}: field 'metadata' must be an object, got {meta['metadata']!r:.80}")
    if not isinstance(meta["library_version"], str):
        raise ValueError(f"{where}: field 'library_version' must be a str, got {meta['library_version']!r}")
    task_index = meta["task_index"]
    if not _is_int(task_index) or task_index < 0:
        raise ValueError(f"{where}: field 'task_index' must be an integer >= 0, got {task_index!r}")
    cfg = meta["slao"]
    if not isinstance(cfg, dict) or set(cfg) != {"lam", "init", "merge"}:
        raise ValueError(f"{where}: field 'slao' must be an object with exactly the keys "
                         f"['init', 'lam', 'merge'], got {cfg!r}")
    lam, init, merge = cfg["lam"], cfg["init"], cfg["merge"]
    if not ((isinstance(lam, str) and lam in LAMBDAS) or (_is_real(lam) and 0.0 < lam <= 1.0)):
        raise ValueError(f"{where}: field 'slao.lam' must be one of {list(LAMBDAS)} or a number in (0, 1], "
                         f"got {lam!r}")
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"{where}: field 'slao.init' must be one of {list(INITS)}, got {init!r}")
    if not isinstance(merge, str) or merge not in MERGES:
        raise ValueError(f"{where}: field 'slao.merge' must be one of {list(MERGES)}, got {merge!r}")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: field 'layers' must be a non-empty object of module path -> layer, got {layers!r:.80}")
    expected: dict[str, tuple[list[int], str]] = {}
    keys = {"rank", "alpha", "rslora", "in", "out", "dtype"}
    for name, spec in layers.items():
        field = f"layers[{name!r}]"
        if not isinstance(spec, dict) or set(spec) != keys:
            raise ValueError(f"{where}: field {field} must be an object with exactly the keys {sorted(keys)}, "
                             f"got {spec!r}")
        for k in ("rank", "in", "out"):
            if not _is_int(spec[k]) or spec[k] < 1:
                raise ValueError(f"{where}: field {field}.{k} must be an integer >= 1, got {spec[k]!r}")
        if not _is_real(spec["alpha"]):
            raise ValueError(f"{where}: field {field}.alpha must be a finite number, got {spec['alpha']!r}")
        if not isinstance(spec["rslora"], bool):
            raise ValueError(f"{where}: field {field}.rslora must be true or false, got {spec['rslora']!r}")
        if spec["dtype"] not in _ADAPTER_DTYPES:
            raise ValueError(f"{where}: field {field}.dtype must be one of {list(_ADAPTER_DTYPES)}, "
                             f"got {spec['dtype']!r}")
        a_shape, b_shape = [spec["rank"], spec["in"]], [spec["out"], spec["rank"]]
        expected[f"{name}.lora_A"] = (a_shape, spec["dtype"])
        expected[f"{name}.lora_B"] = (b_shape, spec["dtype"])
        if task_index >= 1:  # end_task() has run: the controller's buffers exist
            expected[f"{name}.buffer_B"] = (b_shape, spec["dtype"])
            if merge in ("A", "AB"):
                expected[f"{name}.buffer_A"] = (a_shape, spec["dtype"])
    if tensors is not None:
        missing_t, extra_t = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing_t or extra_t:
            raise ValueError(f"{where}: task_index={task_index} and merge={merge!r} need exactly the tensors "
                             f"lora_A, lora_B{', buffer_B' if task_index else ''}"
                             f"{', buffer_A' if task_index and merge in ('A', 'AB') else ''} per layer; "
                             f"missing {missing_t[:3]}{' …' if len(missing_t) > 3 else ''}, "
                             f"unexpected {extra_t[:3]}{' …' if len(extra_t) > 3 else ''}")
        for key, (shape, dtype) in expected.items():
            t = tensors[key]
            if list(t.shape) != shape or str(t.dtype).replace("torch.", "") != dtype:
                raise ValueError(f"{where}: tensor {key} must be {shape} {dtype} (from field 'layers'), "
                                 f"got {list(t.shape)} {str(t.dtype).replace('torch.', '')}")
    return {"task_index": task_index, "lam": lam, "init": init, "merge": merge, "layers": layers}


# --------------------------------------------------------------------------- PEFT format

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
        _discard(p)


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
            _write_file(os.path.join(new, fname), data)
        _fsync_dir(new)
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
        _fsync_dir(parent)
    except BaseException:
        _discard(new)
        raise
    _discard(new)


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
    if is_main_process():
        data = _safetensors_bytes(tensors, metadata={"format": "pt"})
        _replace_directory(directory, {"adapter_model.safetensors": data, "adapter_config.json": config_bytes})
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
    if not isinstance(config, dict):
        raise ValueError(f"PEFT adapter: adapter_config.json must hold a JSON object, got {type(config).__name__}")
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
    rank, alpha, rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora", False)
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"PEFT adapter: field 'r' of adapter_config.json must be an integer >= 1, got {rank!r}")
    if not _is_real(alpha):
        raise ValueError(f"PEFT adapter: field 'lora_alpha' of adapter_config.json must be a finite number, "
                         f"got {alpha!r}")
    if not isinstance(rslora, bool):
        raise ValueError(f"PEFT adapter: field 'use_rslora' of adapter_config.json must be true or false, "
                         f"got {rslora!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
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
