"""Strip outputs, execution counts and widget state from notebooks (what `make strip` runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

KEEP_NOTEBOOK_META = ("kernelspec", "language_info", "slm_course", "colab", "accelerator")


def strip(path: Path) -> bool:
    """Strip one notebook in place; return True if it changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("widgets", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = nbformat.from_dict({k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_META})
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("\n" if not after.endswith("\n") else ""))
        return True
    return False


if __name__ == "__main__":
    changed = [p for p in map(Path, sys.argv[1:]) if strip(p)]
    print(f"stripped {len(changed)} of {len(sys.argv) - 1} notebooks" + (": " + ", ".join(map(str, changed)) if changed else ""))
