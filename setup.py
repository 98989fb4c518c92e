"""The optional C++ build of slao_kernels.

Package metadata (name, version, dependencies, extras, the ``slao`` command)
lives in pyproject.toml; this file only adds the extension.

The C++ CPU kernels in ``csrc/`` are compiled when torch's headers and a C++
compiler are available (``pip install --no-build-isolation -e .``). Without
them the package still installs; importing it then warns once that the CPU
ops run on the pure-torch reference instead.

Environment switches:
  SLAO_NO_EXTENSION=1   skip the C++ build entirely.
  SLAO_PORTABLE=1       build without -march=native (for a binary that runs
                        on another CPU than the one that built it).
"""

import os
import sys

from setuptools import setup

# The import name of the package the extension is built into (pyproject.toml's project.name).
PACKAGE = "slao_kernels"


def _extension_build():
    """Return (ext_modules, cmdclass) for the C++ kernels, or ([], {}) with a reason printed."""
    if os.environ.get("SLAO_NO_EXTENSION") == "1":
        print("slao_kernels: SLAO_NO_EXTENSION=1, skipping the C++ build", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # torch absent at build time (e.g. isolated build env)
        print(f"slao_kernels: torch not importable ({exc}); installing without C++ kernels", file=sys.stderr)
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cpp")
    )
    # -fopenmp: at::parallel_for is a header template that runs serially unless
    # the extension itself is compiled with OpenMP (torch links the same runtime).
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("SLAO_PORTABLE") != "1":
        # Built where it runs (a source install), so use every vector unit this CPU has.
        cxx_flags.append("-march=native")
    ext = CppExtension(f"{PACKAGE}._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Build the kernels, but never fail the install over them: the package
        has a pure-torch fallback and says so loudly at import time."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                print(f"slao_kernels: C++ kernels failed to build ({exc}); "
                      "the CPU ops will fall back to the torch reference", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_build()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
