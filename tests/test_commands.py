"""Every command a reader is told to type works: the command lines in README, CONTRIBUTING, docs/, the configs'
comments and the notebooks' markdown are found, parsed and dry-run (nothing trains, nothing installs).

- `python -m helpers.launch …` (alone or after `accelerate launch`): parsed by the launcher's own parser, and the
  recipe file plus every `--set key=value` is validated by `helpers.launch.load_recipe` — what `--print-config` does;
- `accelerate launch --config_file F …`: F exists and is a YAML mapping;
- `make TARGET …`: `make -n` (dry run) accepts it;
- `python scripts/X.py …` / `papermill NOTEBOOK …`: the script or notebook exists.
Placeholders (`…`, `...`, `<name>`, `{OUTPUT}`) mark an illustration, not a command: those are skipped, and counted.
"""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import launch

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"…|\.\.\.|<[a-z_-]+>|\{[A-Z_]+\}")
MENTION = re.compile(r"python -m helpers\.\w+( --config)?")  # the program named in prose, not a command
STARTS = ("python -m helpers.", "python scripts/", "accelerate launch", "make ", "papermill ", ".venv/bin/papermill ")


def prose_sources() -> dict[str, tuple[list[str], bool]]:
    """Text a reader reads, by file: (lines, whether whole lines are commands outside code fences)."""
    out = {}
    for path in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        out[str(path.relative_to(ROOT))] = (path.read_text().splitlines(), False)
    for path in sorted((ROOT / "configs").rglob("*.yaml")):  # YAML comments: indented example commands
        lines = [ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.lstrip().startswith("#")]
        out[str(path.relative_to(ROOT))] = (lines, True)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        lines = [ln for c in cells if c["cell_type"] == "markdown" for ln in "".join(c["source"]).splitlines()]
        out[str(path.relative_to(ROOT))] = (lines, False)
    return out


def candidates(lines: list[str], whole_lines: bool) -> list[str]:
    """Command lines: inline code spans, and whole lines inside code fences (or everywhere when `whole_lines`)."""
    found, fenced, buf = [], False, ""
    for line in lines:
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if (fenced or whole_lines) and line.rstrip().endswith("\\"):  # a shell continuation
            buf += line.rstrip()[:-1] + " "
            continue
        line, buf = buf + line, ""
        spans = [line] if fenced or whole_lines else re.findall(r"`([^`]+)`", line)
        for span in spans:
            text = span.strip().lstrip("$!").strip()
            text = re.split(r"\s+#\s", text)[0].strip()  # a trailing shell comment
            if not text.startswith(STARTS):  # a line of prose or a listing that mentions a command mid-line
                continue
            for part in re.split(r"\s*(?:&&|;)\s*", text):
                if part.startswith(STARTS) and not MENTION.fullmatch(part):
                    found.append(part)
    return found


def all_commands() -> list[tuple[str, str]]:
    return [(src, cmd) for src, (lines, whole) in prose_sources().items() for cmd in candidates(lines, whole)]


def check_launch(argv: list[str]) -> None:
    args = launch.build_parser().parse_args(argv)
    launch.load_recipe(ROOT / args.config, args.set)


def check(cmd: str) -> None:
    """Raise (with the reason) if the command would not run as written."""
    argv = shlex.split(cmd)
    if "helpers.launch" in argv:
        if argv[0] == "accelerate":
            cfg = argv[argv.index("--config_file") + 1]
            assert isinstance(yaml.safe_load((ROOT / cfg).read_text()), dict), f"{cfg} is not an accelerate config"
        check_launch(argv[argv.index("helpers.launch") + 1:])
    elif argv[0] == "make":
        res = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-500:]
    elif argv[0] == "python" and argv[1].startswith("scripts/"):
        assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
    elif argv[0].endswith("papermill"):
        assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
    elif argv[:2] == ["python", "-m"]:
        module = argv[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}"


COMMANDS = all_commands()
CHECKED = [(s, c) for s, c in COMMANDS if not PLACEHOLDER.search(c)]


def test_commands_are_found():
    """The scan sees the commands the course tells readers to type (so the test below checks something)."""
    kinds = {c.split()[0] + (" -m helpers.launch" if "helpers.launch" in c else "") for _, c in CHECKED}
    assert {"make", "python -m helpers.launch", "accelerate -m helpers.launch"} <= kinds, kinds
    assert len(CHECKED) >= 20 and len(CHECKED) > len(COMMANDS) // 2, (len(CHECKED), len(COMMANDS))


@pytest.mark.parametrize(("source", "command"), CHECKED, ids=[f"{s}:{c[:60]}" for s, c in CHECKED])
def test_command_runs_as_written(source, command):
    check(command)


def test_a_bad_set_key_is_caught():
    """The check would catch the mistake readers met: `--set quant_storage=…` (the key lives under `launch.`)."""
    with pytest.raises(ValueError, match="quant_storage"):
        check("python -m helpers.launch --config configs/sft_phi2_qlora_a100.yaml --set quant_storage=bfloat16")
    check("python -m helpers.launch --config configs/sft_phi2_qlora_a100.yaml --set launch.quant_storage=bfloat16")
    with pytest.raises(AssertionError):
        check("make no-such-target")
