"""Notebook 04's recipe reads its values from literals, and those literals are the profiles in configs/ (one source
for the command line, readable in place in the notebook)."""

import ast
import json
from pathlib import Path

import pytest

from helpers import launch, train

ROOT = Path(__file__).resolve().parent.parent
NB04 = ROOT / "notebooks" / "04_sft_training.ipynb"
CELLS = json.loads(NB04.read_text())["cells"]


def profile(name: str) -> train.TrainConfig:
    return launch.load_recipe(ROOT / train.PROFILE_FILES[name])[0]


def parameters_cell() -> dict:
    """The literal assignments of notebook 04's parameters cell."""
    cell = next(c for c in CELLS if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)}


def recipe_calls(func: str) -> dict:
    """Keyword arguments written as literals in the recipe cells' calls to `func` (e.g. SFTConfig)."""
    found = {}
    for cell in CELLS:
        if "recipe" not in cell["metadata"].get("tags", []):
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == func:
                for kw in node.keywords:
                    try:
                        found[kw.arg] = ast.literal_eval(kw.value)
                    except ValueError:
                        continue
    return found


def test_the_parameters_cell_is_the_cpu_profile():
    values = parameters_cell()
    assert {name: values[name] for name in launch.RECIPE_PARAMETERS} == launch.profile_parameters(profile("cpu"))


def test_recipe_inputs_are_the_smoke_profile():
    inputs = json.loads(NB04.read_text())["metadata"]["slm_course"]["recipe_inputs"]
    assert {name: inputs[name] for name in launch.RECIPE_PARAMETERS} == launch.profile_parameters(profile("smoke"))


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_the_recipe_literals_hold_in_every_profile(name):
    """Values written in the recipe itself (not parameters) must be the same in every profile the notebook runs."""
    cfg = profile(name)
    lora_kw, sft_kw = recipe_calls("LoraConfig"), recipe_calls("SFTConfig")
    assert lora_kw["target_modules"] == cfg.lora_targets
    assert (sft_kw["packing"], sft_kw["completion_only_loss"]) == (cfg.packing, cfg.completion_only_loss)
    assert (sft_kw["save_total_limit"], sft_kw["report_to"]) == (cfg.save_total_limit, cfg.report_to)


def test_follow_profile_moves_only_untouched_values():
    cpu, gpu = launch.profile_parameters(profile("cpu")), profile("gpu")
    moved = launch.follow_profile({**cpu, "LORA_R": 4}, gpu)
    assert moved["LORA_R"] == 4                                          # the reader's value is kept
    assert moved["LEARNING_RATE"] == gpu.learning_rate == 2e-4 and moved["QUANTIZATION"] == "nf4"
    assert launch.recipe_config(moved, gpu).lora_r == 4 and launch.recipe_config(cpu, gpu).quantization is None
    with pytest.raises(ValueError, match="not recipe parameters"):
        launch.follow_profile({"LORA_RANK": 4}, gpu)


def test_trl_no_longer_prepares_a_4bit_model_itself():
    """Notebook 02 says TRL 1.x's SFTTrainer does not call `prepare_model_for_kbit_training` (TRL 0.7.4, the 2023
    script's, did): a TRL release that brings it back makes this fail, and 02's paragraph must change with it."""
    import inspect

    from trl.trainer import sft_trainer

    assert "prepare_model_for_kbit_training" not in inspect.getsource(sft_trainer)
