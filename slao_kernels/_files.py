"""Files written and read safely, for the checkpoint and PEFT formats.

Every write goes to a temporary name in the target's directory (``.tmp-<name>.<8 hex>``),
is fsynced and renamed into place, so a reader sees the old file or the new one;
what a killed write leaves behind is removed by the next write of the same file.
Reads are strict where the content is ours (JSON without NaN or duplicate keys),
and tensors are checked finite before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil

import torch

TMP_PREFIX = ".tmp-"
"""Prefix of every temporary file or directory a write makes; a killed write leaves them."""


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: str) -> None:
    """Remove a temporary file or directory if it is there (a symlink itself, never its target)."""
    if os.path.islink(path) or os.path.isfile(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def write_file(path: str, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, fsynced, with the usual permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(base: str) -> str:
    return f"{TMP_PREFIX}{base[:200]}."  # + 8 hex digits; [:200] keeps the name under NAME_MAX


def write_atomic(path: str, write) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary file in the same
    directory (``.tmp-<name>.<8 hex>``), fsync, then rename over ``path``: readers
    see the old or the new file, never a partial one. The temporary files that an
    earlier, killed write of ``path`` left are removed first."""
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stale = re.compile(re.escape(temporary_name(base)) + r"[0-9a-f]{8}")
    for name in os.listdir(directory):
        if stale.fullmatch(name):
            discard(os.path.join(directory, name))
    while True:
        tmp = os.path.join(directory, temporary_name(base) + secrets.token_hex(4))
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
        fsync_dir(directory)
    except BaseException:
        discard(tmp)
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


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def load_safetensors_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
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


def read_json(path: str, what: str, strict: bool = False):
    """Parse the JSON file ``path``; ``strict`` also refuses NaN/Infinity and duplicate keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    hooks = dict(object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant) if strict else {}
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"), **hooks)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from exc

def remove_leftovers(directory: str) -> None:
    """Remove the ``.tmp-*`` files a killed write left in ``directory``."""
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            discard(os.path.join(directory, name))


def check_directory_target(directory, what: str) -> None:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{what}: directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{what}: {os.fspath(directory)} exists and is not a directory "
                         "(expected a directory or a path that does not exist yet)")

def is_int(v) -> bool:
    """An int that is not a bool (JSON true/false are not counts)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
