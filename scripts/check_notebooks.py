"""The notebook gate of `make lint`: committed notebooks are clean and follow the course's conventions.

Fails if a notebook is not stripped (outputs, execution counts, metadata: strip_notebooks.py); not exactly one `parameters` cell;
a parameters cell that is not plain literal assignments; no `checks` cell with an assert; a bad name; a recipe
cell that could not run alone (read without running it: scripts/run_recipes.py `analyse`); once docs/results.json
exists (`make results` writes it), a numbered notebook whose 2nd cell is not the reference-results block that
snapshot renders (scripts/collect_metrics.py `render_block`), so the block can neither be missing nor stale.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_metrics  # noqa: E402
import run_recipes  # noqa: E402
import strip_notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "docs" / "results.json"  # absent until the first `make results`: the results check is off until then

NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
SHARED_PARAMS = ("SMOKE", "SEED", "OUTPUT_DIR")


def literal_assignments(source: str) -> dict[str, object]:
    """Parse a parameters cell; raise ValueError unless every statement is `NAME = <literal>`."""
    values = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"line {node.lineno}: only `NAME = literal` assignments belong in the parameters cell")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"line {node.lineno}: {node.targets[0].id} is not a plain literal (derive it in the next cell)") from None
    return values


def results_problems(cells: list[dict], stem: str, snapshot: dict) -> list[str]:
    """The reference-results block: one, as the 2nd cell, equal to what the snapshot renders for `stem`."""
    found = [i for i, c in enumerate(cells) if collect_metrics.is_results_cell(c)]
    if not found:
        return ["no reference-results block (its 2nd cell, from docs/results.json): run make results"]
    if found != [1]:
        return [f"the reference-results block must be the 2nd cell, once (found at cells {found}): run make results"]
    if "".join(cells[1]["source"]) != collect_metrics.render_block(snapshot, stem):
        return ["the reference-results block differs from docs/results.json (stale or edited by hand): run make results"]
    return []


def problems(path: Path, snapshot: dict | None = None) -> list[str]:
    """Everything wrong with one committed notebook, as readable messages (`snapshot`: docs/results.json, if any)."""
    out = []
    if not NAME.match(path.name):
        out.append("name must look like NN_snake_topic.ipynb")
    nb = json.loads(path.read_text())
    cells = nb.get("cells", [])
    if len(set(strip_notebooks.stripped(path))) == 2:
        out.append("carries outputs, execution counts or Jupyter/papermill metadata: run make strip")
    tagged = lambda tag: [c for c in cells if tag in c.get("metadata", {}).get("tags", [])]  # noqa: E731
    params = tagged("parameters")
    if len(params) != 1:
        out.append(f"{len(params)} cells tagged 'parameters' (want exactly one)")
    else:
        try:
            values = literal_assignments("".join(params[0]["source"]))
            missing = [p for p in SHARED_PARAMS if p not in values]
            if missing:
                out.append(f"parameters cell lacks the shared parameters {missing}")
        except (ValueError, SyntaxError) as err:
            out.append(f"parameters cell: {err}")
    checks = tagged("checks")
    if len(checks) != 1 or "assert" not in "".join(checks[0]["source"]):
        out.append("needs exactly one cell tagged 'checks' containing asserts")
    elif cells.index(checks[0]) != max(i for i, c in enumerate(cells) if c.get("cell_type") == "code"):
        out.append("the 'checks' cell must be the last code cell")
    meta = nb.get("metadata", {}).get("slm_course", {})
    for i, cell in enumerate(cells):
        if "recipe" not in cell.get("metadata", {}).get("tags", []):
            continue
        src = "".join(cell["source"])
        if not src.startswith("# recipe"):
            out.append(f"recipe cell {i} must start with a '# recipe · what it does' comment")
    if tagged("recipe") and not meta.get("recipe_inputs", {}).get("SMOKE"):
        out.append('recipe cells need "recipe_inputs" (with "SMOKE": true) in the slm_course metadata')
    if tagged("recipe"):
        try:
            out += run_recipes.analyse(path)[0]
        except SyntaxError as err:
            out.append(f"a code cell does not parse: {err}")
    if len(tagged("colab")) != 1:
        out.append("needs exactly one cell tagged 'colab' (the Colab install cell)")
    if not isinstance(meta.get("artefacts"), list) or not isinstance(meta.get("timeout"), int):
        out.append('metadata needs "slm_course": {"artefacts": [...], "timeout": <seconds>}')
    if snapshot is not None and NAME.match(path.name):
        out += results_problems(cells, path.stem, snapshot)
    return out


def main(folder: str, snapshot: Path = SNAPSHOT) -> int:
    """Check every notebook in `folder` (their results blocks against `snapshot` if it exists); print problems."""
    paths = sorted(Path(folder).glob("*.ipynb"))
    snap = json.loads(snapshot.read_text()) if snapshot.exists() else None
    if snap is None:
        print(f"notebook gate: no {snapshot.name} yet, so reference-results blocks are not checked (make results writes it)")
    bad = {p: problems(p, snap) for p in paths}
    for p, msgs in bad.items():
        for m in msgs:
            print(f"{p}: {m}")
    n_bad = sum(1 for m in bad.values() if m)
    print(f"notebook gate: {len(paths) - n_bad} of {len(paths)} notebooks clean")
    return 1 if n_bad or not paths else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "notebooks"))
