"""The library's version, from one source: the installed package's metadata.

The build configuration (``setup.py``/``pyproject.toml``) sets it; nothing else
in the source spells it. A source tree that pip never installed (imported
through ``PYTHONPATH``) has no metadata and reports :data:`UNINSTALLED_VERSION`
rather than a guess. This module imports nothing of the package, so any layer
may use it (the root re-exports ``__version__``; checkpoints and benchmark
results record it).
"""

from __future__ import annotations

import importlib.metadata

UNINSTALLED_VERSION = "0+unknown"
"""The version reported when ``slao_kernels`` is not installed (valid PEP 440,
sorting before every release)."""


def library_version() -> str:
    """The version of the installed ``slao_kernels`` distribution, or
    :data:`UNINSTALLED_VERSION` when there is no installed distribution."""
    try:
        return importlib.metadata.version("slao_kernels")
    except importlib.metadata.PackageNotFoundError:
        return UNINSTALLED_VERSION


__version__: str = library_version()
"""The version of this import of the library, read once."""
