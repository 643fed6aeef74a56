"""Run a notebook's recipe cells alone, the way a reader pastes them into an empty notebook.

A recipe cell (tagged ``recipe``) may use only the pinned libraries and the names that the parameters cell or
earlier recipe cells define. This script runs, in a fresh Python process where ``import helpers`` fails and the
working directory is an empty folder: the parameters cell, then the parameter values given here (smoke values and
concrete paths — what a reader types), then every recipe cell in order. It fails on the first cell that leans on
anything else (a NameError, an ImportError of ``helpers``, a file of the course it did not ask for).

    python scripts/run_recipes.py notebooks/04_sft_training.ipynb --workdir /tmp/r04 \
        -p SMOKE True -p MODEL '"/path/to/model"' -p RECIPE '"configs/sft_smoke_tinyphi.yaml"'

Each -p value is a Python literal. The notebook's metadata can declare the inputs its recipe needs
(``slm_course.recipe_inputs``: name → "repo:<path in the repository>" | "work:<path in the work folder>" |
"<kind>:<arg>" resolved by the caller, e.g. "model:tiny-phi" | a Python literal); `resolve_inputs` turns them
into values.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "recipe"

PRELUDE = """
import sys
sys.modules["helpers"] = None          # `import helpers` raises ImportError, as in a reader's own project
sys.path[:] = [p for p in sys.path if p not in ("", {root!r}) and not p.startswith({root!r} + "/scripts")]
"""


def cells(notebook: Path) -> tuple[str, list[str]]:
    """(the parameters cell's source, the recipe cells' sources in order)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(params) != 1:
        raise ValueError(f"{notebook}: expected one cell tagged 'parameters', found {len(params)}")
    recipes = ["".join(c["source"]) for c in code if TAG in c.get("metadata", {}).get("tags", [])]
    return "".join(params[0]["source"]), recipes


def recipe_inputs(notebook: Path) -> dict[str, str]:
    """The inputs the notebook declares for running its recipe alone (metadata slm_course.recipe_inputs)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    return dict(nb["metadata"].get("slm_course", {}).get("recipe_inputs", {}))


def resolve_inputs(spec: dict[str, object], workdir: Path, resolvers: dict | None = None) -> dict[str, object]:
    """Declared inputs → values. "repo:<path>" and "work:<path>" are paths; "<kind>:<arg>" with a kind in
    `resolvers` calls resolvers[kind](arg, workdir) (e.g. model: → an offline model's folder); else a literal."""
    resolvers = {"repo": lambda arg, _: str(ROOT / arg), "work": lambda arg, work: str(work / arg), **(resolvers or {})}
    out: dict[str, object] = {}
    for name, value in spec.items():
        kind, _, arg = value.partition(":") if isinstance(value, str) else ("", "", "")
        out[name] = resolvers[kind](arg, workdir) if kind in resolvers else value
    return out


def program(notebook: Path, values: dict[str, object]) -> str:
    """The script a reader's empty notebook amounts to: parameters cell, their own values, the recipe cells."""
    params, recipes = cells(notebook)
    if not recipes:
        raise ValueError(f"{notebook}: no cell is tagged {TAG!r}")
    for src in recipes:
        if any(line.lstrip().startswith(("%", "!")) for line in src.splitlines()):
            raise ValueError(f"{notebook}: a recipe cell uses IPython magics; recipes are plain Python")
    given = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    parts = [PRELUDE.format(root=str(ROOT)), "# --- the parameters cell", params, "# --- the reader's values", given]
    for i, src in enumerate(recipes, start=1):
        parts += [f"print('--- recipe cell {i}/{len(recipes)}', flush=True)", src]
    return "\n".join(parts) + "\nprint('--- all recipe cells ran', flush=True)\n"


def run(notebook: Path, workdir: Path, values: dict[str, object], timeout: float = 900,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the recipe program in a fresh interpreter inside `workdir` (created; an empty folder is best)."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / f"{notebook.stem}_recipe.py"
    script.write_text(program(notebook, values), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": "", "MPLBACKEND": "Agg", **(env_extra or {})}
    return subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "LITERAL"))
    args = ap.parse_args()
    values = {name: ast.literal_eval(literal) for name, literal in args.p}
    res = run(args.notebook, args.workdir, values)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr[-5000:])
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
