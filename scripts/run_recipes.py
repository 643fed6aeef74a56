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
import builtins
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "recipe"
MAGIC = re.compile(r"^\s*[%!]", re.M)

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
        env_extra: dict[str, str] | None = None, cpus: set[int] | None = None) -> subprocess.CompletedProcess:
    """Run the recipe program in a fresh interpreter inside `workdir` (created; an empty folder is best),
    on the cores `cpus` if given."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / f"{notebook.stem}_recipe.py"
    script.write_text(program(notebook, values), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": "", "MPLBACKEND": "Agg", **(env_extra or {})}
    with subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        if cpus:  # before the interpreter has imported anything, so every thread it starts inherits it
            os.sched_setaffinity(proc.pid, cpus)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n--- killed after {timeout:.0f} s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---- the static half: what each recipe cell reads, and which cell last bound it (nothing is executed) ----

def _code(cell: dict) -> str:
    """A code cell's source with IPython magics blanked (they are not Python)."""
    return MAGIC.sub("pass  # ", "".join(cell["source"]))


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
          ast.GeneratorExp)
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _stored(node: ast.AST) -> set[str]:
    """Names bound anywhere inside `node` (assignments, loop/with targets, imports, defs, except ... as)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or (
                isinstance(n, ast.ExceptHandler) and n.name):
            out.add(n.name)
    return out


def _free(node: ast.AST) -> set[str]:
    """Names a function, lambda, class or comprehension reads from outside itself (defaults: at definition)."""
    if isinstance(node, FUNCS):
        a = node.args
        local = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x}
        outer = [*a.defaults, *[d for d in a.kw_defaults if d]]
        inner = node.body if isinstance(node.body, list) else [node.body]
    else:
        local, outer, inner = set(), [], list(ast.iter_child_nodes(node))
    local |= set().union(*map(_stored, inner)) if inner else set()
    return set().union(*map(_loads, outer), *(_loads(c) - local for c in inner))


def _loads(node: ast.AST) -> set[str]:
    """Every name `node` reads (of a nested scope: only what it reads from outside)."""
    if isinstance(node, SCOPES):
        return _free(node)
    out = {node.id} if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) else set()
    if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        out.add(node.target.id)
    return out.union(*map(_loads, ast.iter_child_nodes(node)))


def _binds(st: ast.stmt) -> set[str]:
    """Module-level names one simple statement binds (not those inside a function or comprehension it holds)."""
    if isinstance(st, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return _stored(ast.Module(body=[st], type_ignores=[])) if isinstance(st, (ast.Import, ast.ImportFrom)) else {st.name}
    todo, out = [st], set()
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        todo += [c for c in ast.iter_child_nodes(n) if not isinstance(c, SCOPES)]
    return out


BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try)


def reads_and_binds(source: str) -> tuple[set[str], set[str]]:
    """(names a cell reads before binding them itself, names it binds at module level), statement by statement."""
    reads: set[str] = set()
    bound: set[str] = set()

    def walk(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if not isinstance(st, BLOCKS):
                reads.update(_loads(st) - bound)
                bound.update(_binds(st))
                continue
            heads = [x for x in (getattr(st, "test", None), getattr(st, "iter", None)) if x is not None]
            heads += [i.context_expr for i in getattr(st, "items", [])]
            reads.update(set().union(*map(_loads, heads)) - bound)
            for target in [getattr(st, "target", None), *[i.optional_vars for i in getattr(st, "items", [])]]:
                bound.update(_binds(ast.Assign(targets=[target], value=ast.Constant(None))) if target else set())
            for field in ("body", "orelse", "finalbody"):
                walk(getattr(st, field, []))
            for handler in getattr(st, "handlers", []):
                reads.update((_loads(handler.type) if handler.type else set()) - bound)
                bound.update({handler.name} - {None})
                walk(handler.body)

    walk(ast.parse(source).body)
    return reads, bound


def pinned_imports(requirements: Path = ROOT / "requirements.txt") -> set[str]:
    """Top-level import names of the distributions requirements.txt pins (transformers, yaml, llama_cpp, ...)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from colab_setup import norm, pins  # the one reader of requirements.txt's pins (extras allowed)

    pinned = set(pins(requirements))
    return {name for name, dists in packages_distributions().items() if any(norm(d) in pinned for d in dists)}


def _imports(tree: ast.AST) -> list[str]:
    """Modules a cell imports ('.' for a relative import)."""
    out = []
    for st in ast.walk(tree):
        if isinstance(st, ast.Import):
            out += [a.name for a in st.names]
        elif isinstance(st, ast.ImportFrom):
            out.append(st.module if st.level == 0 and st.module else ".")
    return out


def _course_paths(tree: ast.AST, notebook: Path) -> list[str]:
    """String constants that name a file or folder relative to the notebook's folder (missing in an empty one)."""
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and 0 < len(n.value) < 200 and "\n" not in n.value and not Path(n.value).is_absolute()
            and n.value not in (".", "..") and (notebook.parent / n.value).exists()]


def analyse(notebook: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Read a notebook's cells in order, without running them: (problems, touch points).

    Problems: a recipe cell that reads a name no parameter or earlier recipe cell binds, or a parameter that a
    non-recipe cell rebinds and recipe_inputs does not declare (run alone, the recipe would see another value);
    imports outside the standard library and requirements.txt (helpers among them); a path relative to the
    notebook's folder. Touch points: non-recipe cells between two recipe cells that read a recipe's objects
    (cell index, names) — only running the recipe alone shows that they do not change what the next recipe sees.
    """
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    declared = set(nb["metadata"].get("slm_course", {}).get("recipe_inputs", {}))
    code = [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    kinds = {i: next((t for t in ("parameters", TAG) if t in c.get("metadata", {}).get("tags", [])), "other")
             for i, c in code}
    recipe_cells = [i for i in kinds if kinds[i] == TAG]
    allowed = pinned_imports() | set(sys.stdlib_module_names)
    last: dict[str, tuple[str, int]] = {}            # name → (kind of the cell that last bound it, its index)
    params, modules, problems, touches = set(), set(), [], []
    for i, cell in code:
        tree = ast.parse(_code(cell))
        reads, binds = reads_and_binds(_code(cell))
        params |= binds if kinds[i] == "parameters" else set()
        if kinds[i] == TAG:
            for name in sorted(reads - set(dir(builtins))):
                kind, j = last.get(name, ("", -1))
                if not kind:
                    problems.append(f"recipe cell {i} reads {name}, which no earlier cell defines")
                elif kind == "other" and name not in params:
                    problems.append(f"recipe cell {i} reads {name}, which only cell {j} (not a recipe) defines")
                elif kind == "other" and name not in declared:
                    problems.append(f"recipe cell {i} reads {name}, the parameter cell {j} (not a recipe) changes: "
                                    "declare the value a reader gives it in recipe_inputs")
            problems += [f"recipe cell {i} imports {m}: neither the standard library nor pinned in requirements.txt"
                         for m in _imports(tree) if m.split(".")[0] not in allowed]
            problems += [f"recipe cell {i} names {p!r}: a path relative to the notebook's folder, which a reader's "
                         "empty folder lacks (make it a parameter)" for p in _course_paths(tree, Path(notebook))]
        elif recipe_cells and recipe_cells[0] < i < recipe_cells[-1]:
            touched = sorted(n for n in reads if last.get(n, ("",))[0] == TAG and n not in modules)
            touches += [(i, touched)] if touched else []
        modules |= {a.split(".")[0] for a in _imports(tree)} if kinds[i] == TAG else set()
        last.update({name: (kinds[i], i) for name in binds})
    return problems, touches


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
