"""Strip notebooks for committing (what `make strip` and pre-commit run; `make lint` fails on one not stripped).

nbstripout does the stripping: outputs, execution counts and Jupyter's per-cell state (its default keys:
execution times, collapsed/scrolled, widgets); on top, papermill's per-cell record and every notebook-level
metadata key but the ones the course keeps (KEEP_NOTEBOOK_META). Cell ids and tags are kept.

    python scripts/strip_notebooks.py notebooks/*.ipynb          # strip in place
    python scripts/strip_notebooks.py --check notebooks/*.ipynb  # exit 1 if any would change
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbstripout import strip_output

KEEP_NOTEBOOK_META = ("kernelspec", "language_info", "slm_course", "colab", "accelerator")
# nbstripout's own defaults (its command line adds them; the function does not) + papermill's and widgets' cell keys
CELL_KEYS = ("collapsed", "ExecuteTime", "execution", "heading_collapsed", "hidden", "scrolled", "papermill", "widgets")


def _text(nb: nbformat.NotebookNode) -> str:
    """A notebook as nbformat writes it (sorted keys), ending in a newline."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def stripped(path: Path) -> tuple[str, str]:
    """(the notebook as it is, as it should be committed), both as nbformat writes them: nbstripout strips."""
    nb = nbformat.read(path, as_version=4)
    before = _text(nb)
    keys = [f"cell.metadata.{k}" for k in CELL_KEYS] + [f"metadata.{k}" for k in nb.metadata if k not in KEEP_NOTEBOOK_META]
    return before, _text(strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=keys))


def strip(path: Path) -> bool:
    """Strip one notebook in place; return True if stripping changed it (formatting alone is left as it is)."""
    before, after = stripped(path)
    if after == before:
        return False
    path.write_text(after, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    """Strip (or with --check, only list) the notebooks named; exit 1 under --check if any would change."""
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"]
    changed = [p for p in paths if (len(set(stripped(p))) == 2 if check else strip(p))]
    verb = "would strip" if check else "stripped"
    print(f"{verb} {len(changed)} of {len(paths)} notebooks" + (": " + ", ".join(map(str, changed)) if changed else ""))
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
