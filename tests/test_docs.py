"""The API reference (docs/api.md) lists exactly the public names: every name of each package's
``__all__``, and nothing the packages do not export."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _documented_names(page: str) -> dict[str, set[str]]:
    """Per ``## `module``` section of docs/api.md, the names its table's first column gives."""
    sections, current = {}, None
    for line in page.splitlines():
        heading = re.match(r"## `([\w.]+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif current is not None and line.startswith("| `"):
            current.update(re.findall(r"`([A-Za-z_]\w*)", line.split("|")[1]))
    return sections


def test_every_public_name_is_in_the_api_reference_and_nothing_else():
    import slao_kernels
    import slao_kernels.continual

    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        documented = _documented_names(f.read())
    for module in (slao_kernels, slao_kernels.continual):
        assert documented.get(module.__name__) == set(module.__all__), module.__name__
