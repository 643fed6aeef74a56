"""helpers.compat: every row of the old → new argument table, checked against today's libraries."""

import dataclasses
import inspect

import pytest
import torch

from helpers import compat
from helpers.compat import LEGACY_ARGS, LegacyArgumentError

SAMPLE_VALUE = {"load_in_4bit": True, "load_in_8bit": True, "group_by_length": True, "include_inputs_for_metrics": True,
                "warmup_ratio": 0.03, "evaluation_strategy": "steps", "no_cuda": True, "max_seq_length": 2048,
                "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
                "per_gpu_train_batch_size": 2, "per_gpu_eval_batch_size": 2, "torch_dtype": "float16",
                "use_auth_token": True, "push_to_hub_token": "x", "dataset_text_field": "text", "packing": False,
                "dataset_num_proc": 2, "dataset_kwargs": {"skip_prepare_dataset": False}, "tokenizer": "TOK",
                "overwrite_output_dir": True, "logging_dir": "./logs", "save_safetensors": True,
                "response_template": "### Answer:", "num_of_sequences": 1024, "chars_per_token": 3.6}


def _current_names(where):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    if where == "SFTConfig":
        return {f.name for f in dataclasses.fields(SFTConfig)}
    if where == "SFTTrainer":
        return set(inspect.signature(SFTTrainer.__init__).parameters)
    if where == "LoraConfig":
        return {f.name for f in dataclasses.fields(LoraConfig)}
    return None


def test_every_row_has_a_test_value():
    assert set(SAMPLE_VALUE) == set(LEGACY_ARGS)


@pytest.mark.parametrize("old", sorted(LEGACY_ARGS))
def test_legacy_row(old):
    row = LEGACY_ARGS[old]
    value = SAMPLE_VALUE[old]
    names = _current_names(row.where)
    if names is not None and row.new != old:
        if row.deprecated:  # still accepted with a warning: when it goes, flip the row to removed
            assert old in names, f"{old} is gone from {row.where}: mark the row deprecated=False"
        else:
            assert old not in names, f"{old} still exists on {row.where}: the row is stale"
    if row.new is None:
        with pytest.raises(LegacyArgumentError) as info:
            compat.translate_legacy_args({old: value})
        assert old in str(info.value) and len(str(info.value)) > 40  # says what to do instead
        return
    out = compat.translate_legacy_args({old: value})
    assert list(out) == [row.new]
    if names is not None:
        assert row.new in names, f"{row.new} is not an argument of {row.where}"
    expected = {"group_by_length": "group_by_length", "include_inputs_for_metrics": ["inputs"]}.get(old, value)
    if old in ("load_in_4bit", "load_in_8bit"):
        from transformers import BitsAndBytesConfig

        q = out["quantization_config"]
        assert isinstance(q, BitsAndBytesConfig) and (q.load_in_4bit if old == "load_in_4bit" else q.load_in_8bit)
    else:
        assert out[row.new] == expected
    assert compat.route_args(out)[row.where] == out


@pytest.mark.parametrize("old,value,kind", [
    ("warmup_ratio", 0.03, "SFTConfig"), ("evaluation_strategy", "steps", "SFTConfig"), ("no_cuda", True, "SFTConfig"),
    ("group_by_length", True, "SFTConfig"), ("logging_dir", "x", "SFTConfig"), ("overwrite_output_dir", True, "SFTConfig"),
    ("max_seq_length", 16, "SFTConfig"), ("tokenizer", None, "SFTTrainer"), ("max_seq_length", 16, "SFTTrainer"),
    ("dataset_text_field", "text", "SFTTrainer"),
])
def test_old_names_really_fail_today(old, value, kind, tmp_path):
    from trl import SFTConfig, SFTTrainer

    with pytest.raises(TypeError, match=old):
        if kind == "SFTConfig":
            SFTConfig(output_dir=str(tmp_path), report_to="none", **{old: value})
        else:
            SFTTrainer(model=None, **{old: value})


@pytest.mark.slow
def test_old_from_pretrained_kwargs_fail_today(tiny_dir):
    from transformers import AutoModelForCausalLM

    for kw in ({"use_auth_token": True}, {"load_in_4bit": True}):
        with pytest.raises(TypeError):
            AutoModelForCausalLM.from_pretrained(str(tiny_dir), **kw)
    new = compat.translate_legacy_args({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                       "bnb_4bit_compute_dtype": "float32", "torch_dtype": torch.float32})
    assert new["quantization_config"].bnb_4bit_quant_type == "nf4" and new["dtype"] is torch.float32
    m = AutoModelForCausalLM.from_pretrained(str(tiny_dir), device_map={"": "cpu"}, **new)
    assert getattr(m, "is_loaded_in_4bit", False)


def test_translate_edge_cases():
    assert compat.translate_legacy_args({"learning_rate": 2e-4, "optim": "paged_adamw_32bit"}) == {
        "learning_rate": 2e-4, "optim": "paged_adamw_32bit"}
    with pytest.raises(LegacyArgumentError, match="keep only 'warmup_steps'"):
        compat.translate_legacy_args({"warmup_ratio": 0.1, "warmup_steps": 10})
    with pytest.raises(LegacyArgumentError, match="BitsAndBytesConfig"):
        compat.translate_legacy_args({"bnb_4bit_quant_type": "nf4"})
    assert compat.translate_legacy_args({"load_in_4bit": False}) == {}
    assert compat.translate_legacy_args({"group_by_length": False}) == {"train_sampling_strategy": "random"}
    with pytest.raises(LegacyArgumentError, match="did you mean"):
        compat.route_args({"learnig_rate": 1e-4})


def test_seed_script_translates_and_builds_today():
    """The seed's TrainingArguments + SFTTrainer + from_pretrained kwargs → current, accepted by today's classes."""
    from trl import SFTConfig

    seed = dict(output_dir="./results", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                optim="paged_adamw_32bit", save_steps=500, logging_steps=10, learning_rate=2e-4, fp16=False,
                bf16=False, max_grad_norm=0.3, max_steps=10000, warmup_ratio=0.03, group_by_length=True,
                lr_scheduler_type="constant", dataset_text_field="text", max_seq_length=2048, tokenizer="TOK",
                packing=False, use_auth_token=True, trust_remote_code=True)
    routed = compat.route_args(compat.translate_legacy_args(seed))
    assert routed["SFTTrainer"] == {"processing_class": "TOK"}
    assert routed["from_pretrained"] == {"token": True, "trust_remote_code": True}
    cfg = SFTConfig(**routed["SFTConfig"], report_to="none", use_cpu=True, activation_checkpointing=False)
    assert cfg.max_length == 2048 and cfg.warmup_steps == 0.03 and cfg.train_sampling_strategy == "group_by_length"
