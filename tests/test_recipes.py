"""The recipe cells of every notebook run alone — pasted into an empty notebook, without the course (issue 12).

Two halves, so no recipe is executed twice for the same purpose:
- read, for every notebook (`make lint`, scripts/check_notebooks.py → run_recipes.analyse): a recipe cell reads
  only the parameters cell's names (a parameter a setup cell changes only if recipe_inputs declares the reader's
  value), earlier recipe cells' names and its own imports — the standard library and requirements.txt, never
  `helpers` — and names no file relative to the notebook's folder. The smoke run (test_notebooks.py) then executes
  those same cells on those same objects.
- run, only where reading cannot settle it: a notebook where a non-recipe cell between two recipe cells uses a
  recipe's objects (it could change what the next recipe sees). There the parameters cell, the smoke values and
  concrete paths it declares (metadata slm_course.recipe_inputs), then its recipe cells run in a fresh interpreter
  where `import helpers` fails and the working directory is empty (scripts/run_recipes.py).
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import LANES, ROOT, selected_params

sys.path.insert(0, str(ROOT / "scripts"))
import run_recipes  # noqa: E402
from run_notebooks import notebooks  # noqa: E402

from helpers import data, env, evals, export, models, prefs  # noqa: E402

WITH_RECIPES = [p for p in notebooks() if run_recipes.cells(p)[1]]
TOUCHED = {p.stem: run_recipes.analyse(p)[1] for p in WITH_RECIPES}   # non-recipe cells that use a recipe's objects
RUN_ALONE = [p for p in WITH_RECIPES if TOUCHED[p.stem]]


def pairs_file(n: str, work: Path) -> str:
    """A preference-pairs file from the first `n` training records (notebook 07's recipe reads one)."""
    records = data.read_rows(env.DATA_DIR / "sft" / "train.jsonl")[:int(n)]
    return str(data.write_jsonl(prefs.build_pairs(records, seed=0), work / "pairs.jsonl"))


def test_the_course_has_recipes():
    stems = {p.stem[:2] for p in WITH_RECIPES}
    assert {"02", "03", "04", "05"} <= stems, f"recipe cells expected in 02-05, found in {sorted(stems)}"
    assert {"04", "07", "08", "09"} <= {p.stem[:2] for p in RUN_ALONE}, "training and export recipes are run alone"


def notebook(tmp_path, *cells, inputs=None):
    """A notebook file from (tags, source) pairs."""
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": tags}, "source": [src]} for tags, src in cells],
          "metadata": {"slm_course": {"recipe_inputs": inputs or {}}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "99_lean.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_harness_fails_when_a_recipe_leans_on_the_course(tmp_path):
    cells = [(["parameters"], "X = 1\n"), ([], "Y = 2\n"), (["recipe"], "print(X)\n"), (["recipe"], "print(Y)\n")]
    path = notebook(tmp_path, *cells)
    res = run_recipes.run(path, tmp_path / "work", {})
    assert res.returncode != 0 and "NameError: name 'Y'" in res.stderr          # a name from a non-recipe cell
    path = notebook(tmp_path, *cells[:3], (["recipe"], "from helpers import env\n"))
    res = run_recipes.run(path, tmp_path / "work2", {})
    assert res.returncode != 0 and "helpers" in res.stderr                       # the course is not importable
    path = notebook(tmp_path, *cells[:3], (["recipe"], "print('ok', X + 1)\n"))
    res = run_recipes.run(path, tmp_path / "work3", {"X": 41})                    # the reader's value wins
    assert res.returncode == 0 and "ok 42" in res.stdout


def test_reading_finds_what_running_alone_would(tmp_path):
    (tmp_path / "local.yaml").write_text("a: 1\n")
    path = notebook(tmp_path, (["parameters"], "X = 1\nMODEL = 'auto'\nN = 0\n"),
                    ([], "Y = 2\nMODEL = '/models/m'\nN = 3\nz = []\n"),
                    (["recipe"], "import json\nfrom helpers import env\nimport tinylib.sub\n"
                                 "def f(a, b=N):\n    return a + X + Y + len(z)\n"
                                 "for i in range(X):\n    k = i\nw = [j for j in range(k)]\n"
                                 "open('local.yaml')\nprint(MODEL)\n"),
                    ([], "w.clear()\n"), (["recipe"], "print(json.dumps(w), f(1))\n"), inputs={"MODEL": "model:x"})
    problems, touches = run_recipes.analyse(path)
    expected = ["recipe cell 2 reads N, the parameter cell 1 (not a recipe) changes",   # the reader's N would be 0
                "recipe cell 2 reads Y, which only cell 1 (not a recipe) defines",      # read inside a function too
                "recipe cell 2 reads z, which only cell 1 (not a recipe) defines",
                "recipe cell 2 imports helpers", "recipe cell 2 imports tinylib.sub",   # not in requirements.txt
                "recipe cell 2 names 'local.yaml'"]                                     # found only in the notebook's folder
    assert [p.split(":")[0] for p in problems] == expected, problems   # X, MODEL (declared), a, b, i, j, k, json, f: fine
    assert touches == [(3, ["w"])]    # a non-recipe cell between two recipes uses a recipe's object: run it alone


@pytest.fixture(scope="module", autouse=True)
def queued_runs(request, smoke_runs, tmp_path_factory):
    """Queue the selected recipe runs (two at a time, conftest.py's `Lanes`), after the smoke runs they read."""
    for path in selected_params(request, "path"):
        spec = run_recipes.recipe_inputs(path)
        needs = {arg for kind, _, arg in (str(v).partition(":") for v in spec.values()) if kind == "adapter"}
        for need in needs:
            smoke_runs.start(ROOT / "notebooks" / f"{need}.ipynb")

        def job(cpus, path=path, spec=spec):
            work = tmp_path_factory.mktemp(path.stem)
            resolvers = {"model": lambda name, _: models.model_path(name), "pairs": pairs_file,
                         "adapter": lambda stem, _: str(smoke_runs.adapter(stem)),   # this session's 04 smoke adapter
                         "lm_eval_tasks": lambda sub, w: evals.write_task_dir(w / sub),
                         "converter": lambda pre, _: str(export.find_converter(pre_tokenizer=pre or None))}
            values = run_recipes.resolve_inputs(spec, work, resolvers)
            return values, run_recipes.run(path, work, values, timeout=900, cpus=cpus)

        LANES.submit(("recipe alone", path.stem), job, needs=needs)
    yield
    LANES.wait_all()


@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_ALONE, ids=lambda p: p.stem)
def test_recipe_cells_run_alone(path):
    assert run_recipes.recipe_inputs(path).get("SMOKE") is True, f"{path.name}: declare recipe_inputs with SMOKE true"
    values, res = LANES.jobs[("recipe alone", path.stem)].result()
    n = len(run_recipes.cells(path)[1])
    assert res.returncode == 0, f"{path.name} recipe cells failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    assert f"--- recipe cell {n}/{n}" in res.stdout and "--- all recipe cells ran" in res.stdout
    if path.stem.startswith("04"):   # trained, saved, reloaded, generated
        adapter = Path(values["OUTPUT_DIR"]) / "adapter"
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0 and (adapter / "adapter_config.json").exists()
    if path.stem.startswith("05"):   # the harness scored base and adapter
        assert "'base': {'slm_" in res.stdout and "'tuned': {'slm_" in res.stdout
