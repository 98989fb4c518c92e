"""SLAO checkpoints on disk: the format, its writer and its verified reader.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from slao_kernels._files import (
    check_directory_target,
    is_int,
    is_real,
    load_safetensors_bytes,
    read_json,
    refuse_non_finite,
    remove_leftovers,
    safetensors_bytes,
    write_atomic,
)

CHECKPOINT_FORMAT = "slao_kernels.slao/2"
"""The format :func:`save_checkpoint` writes (``/2``: slao.json carries ``meta_sha256``)."""
READABLE_FORMATS = ("slao_kernels.slao/1", CHECKPOINT_FORMAT)
"""The formats :func:`load_checkpoint` reads (``/1``: as ``/2`` without the JSON checksum)."""
META_CHECKSUM = "meta_sha256"
"""The slao.json field holding the SHA-256 of the canonical JSON of all its other fields."""

_WRITTEN_KEYS = ("format", "tensor_file", "sha256", "tensors", META_CHECKSUM)  # added by save_checkpoint
_TENSOR_FILE = re.compile(r"tensors-[0-9a-f]{16}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ADAPTER_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _canonical_json(payload) -> bytes:
    """The one byte string a JSON value hashes as: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _meta_digest(meta: dict) -> str:
    return hashlib.sha256(_canonical_json({k: v for k, v in meta.items() if k != META_CHECKSUM})).hexdigest()




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
    check_directory_target(directory, what)
    directory = os.fspath(directory)
    data = safetensors_bytes(tensors)
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
    remove_leftovers(directory)
    write_atomic(os.path.join(directory, tensor_file), lambda f: f.write(data))
    json_path = os.path.join(directory, "slao.json")
    write_atomic(json_path, lambda f: f.write(text))  # the commit
    for name in os.listdir(directory):  # tensor files of earlier saves
        if name.startswith("tensors-") and name.endswith(".safetensors") and name != tensor_file:
            os.unlink(os.path.join(directory, name))
    return json_path



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
    meta = read_json(json_path, "SLAO checkpoint", strict=True)
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
                and isinstance(spec["shape"], list) and all(is_int(d) and d >= 0 for d in spec["shape"])):
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
    tensors = load_safetensors_bytes(data, path)
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
    if not is_int(task_index) or task_index < 0:
        raise ValueError(f"{where}: field 'task_index' must be an integer >= 0, got {task_index!r}")
    cfg = meta["slao"]
    if not isinstance(cfg, dict) or set(cfg) != {"lam", "init", "merge"}:
        raise ValueError(f"{where}: field 'slao' must be an object with exactly the keys "
                         f"['init', 'lam', 'merge'], got {cfg!r}")
    lam, init, merge = cfg["lam"], cfg["init"], cfg["merge"]
    if not ((isinstance(lam, str) and lam in LAMBDAS) or (is_real(lam) and 0.0 < lam <= 1.0)):
        raise ValueError(f"{where}: field 'slao.lam' must be one of {list(LAMBDAS)} or a number in (0, 1], "
                         f"got {lam!r}")
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"{where}: field 'slao.init' must be one of {list(INITS)}, got {init!r}")
    if not isinstance(merge, str) or merge not in MERGES:
        raise ValueError(f"{where}: field 'slao.merge' must be one of {list(MERGES)}, got {merge!r}")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: field 'layers' must be a non-empty object of module path -> layer, "
                         f"got {layers!r:.80}")
    expected: dict[str, tuple[list[int], str]] = {}
    keys = {"rank", "alpha", "rslora", "in", "out", "dtype"}
    for name, spec in layers.items():
        field = f"layers[{name!r}]"
        if not isinstance(spec, dict) or set(spec) != keys:
            raise ValueError(f"{where}: field {field} must be an object with exactly the keys {sorted(keys)}, "
                             f"got {spec!r}")
        for k in ("rank", "in", "out"):
            if not is_int(spec[k]) or spec[k] < 1:
                raise ValueError(f"{where}: field {field}.{k} must be an integer >= 1, got {spec[k]!r}")
        if not is_real(spec["alpha"]):
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


