"""The notebook gate (scripts/check_notebooks.py) and the stripper catch what they promise to."""

import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from check_notebooks import literal_assignments, problems  # noqa: E402
from strip_notebooks import strip  # noqa: E402


def make_nb(tmp_path, name="07_demo.ipynb", params="SMOKE = False\nSEED = 0\nOUTPUT_DIR = 'auto'", outputs=False):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})
    body = nbformat.v4.new_code_cell("x = 1")
    if outputs:
        body.outputs = [nbformat.v4.new_output("stream", text="1\n")]
        body.execution_count = 3
    checks = nbformat.v4.new_code_cell("assert x == 1", metadata={"tags": ["checks"]})
    nb.cells = [nbformat.v4.new_markdown_cell("# Demo"), p, body, checks]
    nb.metadata["slm_course"] = {"artefacts": [], "timeout": 60}
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_clean_notebook_passes(tmp_path):
    assert problems(make_nb(tmp_path)) == []


def test_outputs_are_flagged_and_strip_removes_them(tmp_path):
    path = make_nb(tmp_path, outputs=True)
    assert any("outputs" in m for m in problems(path))
    assert strip(path) is True and problems(path) == [] and strip(path) is False


def test_parameters_must_be_plain_literals(tmp_path):
    assert literal_assignments("A = 1\nB = [1, 'x']\nC = None") == {"A": 1, "B": [1, "x"], "C": None}
    with pytest.raises(ValueError, match="not a plain literal"):
        literal_assignments("STEPS = 10 * 2")
    path = make_nb(tmp_path, params="SMOKE = False\nSEED = 0\nOUTPUT_DIR = 'auto'\nimport os")
    assert any("only `NAME = literal`" in m for m in problems(path))


def test_missing_shared_parameter_and_bad_name(tmp_path):
    path = make_nb(tmp_path, name="demo.ipynb", params="SEED = 0")
    msgs = problems(path)
    assert any("NN_snake_topic" in m for m in msgs) and any("SMOKE" in m for m in msgs)


def test_runner_announces_each_code_cell_and_reports_failures(tmp_path):
    from run_notebooks import cell_labels, run_notebook

    path = make_nb(tmp_path)
    labels = cell_labels(path, parameterized=True)  # papermill inserts its injected cell after `parameters`
    assert labels == ["", "SMOKE = False", "(papermill's injected parameters)", "x = 1", "assert x == 1"]
    seen = []
    res = run_notebook(path, tmp_path / "out", ["-p", "SEED", "1"], timeout=120, progress=seen.append)
    assert res.status == "ok", res.detail
    assert [s.split("· ", 1)[1] for s in seen] == labels[1:]
    assert all(f"cell {i}/5" in s for i, s in zip(range(2, 6), seen, strict=True))
    bad = make_nb(tmp_path, name="08_bad.ipynb")
    nb = nbformat.read(bad, as_version=4)
    nb.cells[2].source = "raise RuntimeError('boom in cell 3')"
    nbformat.write(nb, bad)
    res = run_notebook(bad, tmp_path / "out", timeout=120)
    assert res.status == "failed" and "boom in cell 3" in res.detail
