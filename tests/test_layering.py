"""The import rule: layers flow one way, and ``import slao_kernels`` stays light.

Layers, lowest first (a module may import its own layer and those it lists):

  kernels       _ops, _checks, _files, _version, reference, distributed, ops/, the _C extension
  modules       nn, patching, peft_format, quantized            -> kernels
  benchmarking  benchmarking/ (the harness of slao bench)       -> kernels, modules
  continual     continual/ (the engine, runners, model loading) -> kernels, modules
  cli           cli, __main__                                   -> everything

``benchmarking`` and ``continual`` are siblings: neither imports the other. The root
``slao_kernels/__init__.py`` is the public facade: its imports reach the kernels and
modules layers only (the continual names it exposes load lazily, through
``importlib``), and no module of the package imports a name from it. Every import
statement counts, those inside functions included: a lazy import is still a
dependency. A new top-level module has to be given a layer here.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "slao_kernels"
SOURCE = Path(__file__).resolve().parent.parent / PACKAGE

LAYER_OF = {  # first name below slao_kernels -> layer
    **dict.fromkeys(("_C", "_ops", "_checks", "_files", "_version", "reference", "distributed", "ops"), "kernels"),
    **dict.fromkeys(("nn", "patching", "peft_format", "quantized"), "modules"),
    "benchmarking": "benchmarking",
    "continual": "continual",
    **dict.fromkeys(("cli", "__main__"), "cli"),
}
MAY_IMPORT = {
    "kernels": {"kernels"},
    "modules": {"kernels", "modules"},
    "benchmarking": {"kernels", "modules", "benchmarking"},
    "continual": {"kernels", "modules", "continual"},
    "cli": {"kernels", "modules", "benchmarking", "continual", "cli"},
    "facade": {"kernels", "modules"},  # slao_kernels/__init__.py
}


def _is_module(name: str, source: Path) -> bool:
    """Whether ``slao_kernels.<...>`` names a module or package of the tree at ``source``."""
    path = source.joinpath(*name.split(".")[1:])
    return (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
            or any(path.parent.glob(f"{path.name}.*.so")) or any(path.parent.glob(f"{path.name}.*.pyd")))


def _imported_modules(module: str, tree: ast.AST, is_package: bool, source: Path):
    """``(line, imported module)`` of every import of the package in ``tree``; a
    ``from X import name`` counts as importing ``X.name`` when that is a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub, source) else target


def _layer(module: str) -> str:
    if module == PACKAGE:
        return "facade"
    top = module.split(".")[1]
    if top not in LAYER_OF:
        raise KeyError(f"{module}: no layer assigned to {PACKAGE}.{top}; add it to LAYER_OF in tests/test_layering.py")
    return LAYER_OF[top]


def violations_in(module: str, code: str, is_package: bool = False, source: Path = SOURCE) -> list[str]:
    """The import-rule violations of ``code`` as the source of ``module``, one line each."""
    found = []
    own = _layer(module)
    for line, target in _imported_modules(module, ast.parse(code), is_package, source):
        if target == PACKAGE:
            if module != PACKAGE:
                found.append(f"{module}:{line} imports from the {PACKAGE} facade; import the defining module")
            continue
        theirs = _layer(target)
        if theirs not in MAY_IMPORT[own]:
            found.append(f"{module}:{line} ({own}) imports {target} ({theirs})")
    return found


def layer_violations(source: Path = SOURCE) -> list[str]:
    """Every import-rule violation in the package tree at ``source``."""
    found = []
    for path in sorted(source.rglob("*.py")):
        parts = path.relative_to(source.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        found += violations_in(module, path.read_text(encoding="utf-8"), is_package, source)
    return found


def test_no_module_imports_a_layer_above_it():
    assert layer_violations() == []


@pytest.mark.parametrize("module, code", [
    ("slao_kernels.ops.lora_linear", "from slao_kernels.nn import LoRALinear"),
    ("slao_kernels.reference", "import slao_kernels.patching"),
    ("slao_kernels._files", "def f():\n    from slao_kernels.continual.checkpoint import load_checkpoint"),
    ("slao_kernels.nn", "from slao_kernels import benchmarking"),
    ("slao_kernels.peft_format", "from slao_kernels.continual import SLAO"),
    ("slao_kernels.benchmarking.cases", "from slao_kernels.continual.models import load_model"),
    ("slao_kernels.continual.slao", "from slao_kernels import __version__"),  # a name of the facade
    ("slao_kernels.continual.runner", "from slao_kernels.benchmarking.environment import environment"),
    ("slao_kernels.continual.runner", "from slao_kernels import cli"),
    ("slao_kernels.ops.scaled_merge", "from ..continual import slao"),  # relative
    ("slao_kernels", "from slao_kernels.continual import SLAO"),  # the facade loads continual lazily only
])
def test_a_violation_is_reported(module, code):
    assert len(violations_in(module, code)) == 1


@pytest.mark.parametrize("module, code", [
    ("slao_kernels.cli", "from slao_kernels import benchmarking as bench\nfrom slao_kernels.continual import SLAO"),
    ("slao_kernels.continual.slao", "from slao_kernels import distributed\nfrom slao_kernels.nn import LoRALinear"),
    ("slao_kernels.benchmarking.cases", "from slao_kernels.ops.lora_linear import lora_linear"),
    ("slao_kernels.ops.aot", "from slao_kernels.ops import lora_linear, orthonormalize"),
    ("slao_kernels.ops.lora_linear", "from . import _triton\nfrom .. import reference"),
    ("slao_kernels", "from slao_kernels.patching import patch_llama"),
])
def test_allowed_imports_pass(module, code):
    assert violations_in(module, code) == []


def test_a_module_without_a_layer_is_refused():
    with pytest.raises(KeyError, match="no layer assigned"):
        violations_in("slao_kernels.newthing", "import torch")


IMPORT_ROOT = r"""
import importlib.metadata, json, sys
import slao_kernels
heavy = sorted(m for m in sys.modules if m.split(".")[0] == "transformers"
               or m.startswith(("slao_kernels.continual", "slao_kernels.cli", "slao_kernels.benchmarking")))
from slao_kernels import SLAO
from slao_kernels.continual.slao import SLAO as defined
print(json.dumps({"heavy": heavy, "same": SLAO is defined and slao_kernels.SLAO is defined,
                  "listed": "SLAO" in dir(slao_kernels) and "SLAO" in slao_kernels.__all__,
                  "version": slao_kernels.__version__, "metadata": importlib.metadata.version("slao_kernels")}))
"""


def test_import_slao_kernels_loads_neither_the_engine_nor_transformers():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ROOT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["heavy"] == []
    assert result["same"] and result["listed"]  # SLAO still reachable from the root, lazily
    assert result["version"] == result["metadata"]  # one version source: the package metadata
