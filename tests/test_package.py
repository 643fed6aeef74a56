"""The package's house rules, checked: imports go one way, no private names across modules, short functions with
docstrings, and nothing in the product points outside the repository."""

import ast
import re
import subprocess

import pytest

import helpers
from helpers import env

ROOT = env.REPO_ROOT
MODULES = list(helpers.__all__)  # bottom to top: a module may import only modules listed before it
SOURCES = {m: ROOT / "helpers" / f"{m}.py" for m in MODULES}
MAX_FUNCTION_LINES = 60


def _tree(module: str) -> ast.Module:
    return ast.parse(SOURCES[module].read_text(encoding="utf-8"))


def _helpers_imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every `from helpers import m` / `from helpers.m import x`, lazy ones too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "helpers":
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
            out += [(node.module.split(".", 1)[1], a.name) for a in node.names]
    return out


def test_every_module_is_listed_once_in_the_layer_order():
    on_disk = sorted(p.stem for p in (ROOT / "helpers").glob("*.py") if p.stem != "__init__")
    assert sorted(MODULES) == on_disk and len(set(MODULES)) == len(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_one_way_and_never_take_private_names(module):
    for other, name in _helpers_imports(_tree(module)):
        assert other in MODULES, f"helpers/{module}.py imports unknown helpers.{other}"
        assert MODULES.index(other) < MODULES.index(module), (
            f"helpers/{module}.py imports helpers.{other}, which sits above it in helpers.__all__ (the layer order)")
        assert not (name or "").startswith("_"), f"helpers/{module}.py imports the private {other}.{name}"


def _private_uses(text: str) -> list[str]:
    return re.findall(r"\b(?:" + "|".join(MODULES) + r")\._[a-z]\w*", text)


@pytest.mark.parametrize("folder", ["helpers", "notebooks", "scripts"])
def test_no_private_name_of_another_module_is_used(folder):
    hits = {}
    for path in sorted((ROOT / folder).glob("*.py")) + sorted((ROOT / folder).glob("*.ipynb")):
        found = [u for u in _private_uses(path.read_text(encoding="utf-8")) if u.split(".")[0] != path.stem]
        if found:
            hits[path.name] = sorted(set(found))
    assert not hits, f"private names used across modules: {hits}"


@pytest.mark.parametrize("module", MODULES)
def test_functions_are_short_and_public_ones_say_what_they_do(module):
    long, undocumented = [], []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    for node in _tree(module).body:  # module-level functions: the public API
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node) is None:
            undocumented.append(node.name)
    assert not long, f"helpers/{module}.py: functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert not undocumented, f"helpers/{module}.py: public functions without a docstring: {undocumented}"


def test_nothing_in_the_product_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|facts\.md")
    hits = [f for f in files if (ROOT / f).is_file() and f != "tests/test_package.py"
            and (ROOT / f).suffix in {".py", ".ipynb", ".md", ".yaml", ".yml", ".toml", ".txt", ""}
            and pattern.search((ROOT / f).read_text(encoding="utf-8", errors="replace"))]
    assert not hits, f"files that cite something outside the repository: {hits}"
