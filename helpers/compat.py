"""Old → new arguments: one table of what 2023-era scripts (the seed's) pass and what today's APIs take.

`LEGACY_ARGS` is the single source: :func:`translate_legacy_args` maps old names to current ones (or raises
:class:`LegacyArgumentError` naming the replacement where there is no automatic mapping), :func:`route_args` says
where each current argument goes, :func:`check_kwargs` guards a function's keyword arguments (`models.load_model`),
and :func:`legacy_table` is what notebook 04 shows. Every row is checked against the installed libraries
(tests/test_compat.py: the old name really fails or warns today, the new one is accepted).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class LegacyArgumentError(TypeError):
    """An argument from an older transformers/TRL/peft API that has no automatic replacement; says what to do."""


def _bnb_from(values: Mapping, bits: int):
    from transformers import BitsAndBytesConfig

    extra = {k: v for k, v in values.items() if k.startswith("bnb_4bit_") or k.startswith("llm_int8_")}
    return BitsAndBytesConfig(**({"load_in_4bit": True} if bits == 4 else {"load_in_8bit": True}), **extra)


@dataclass(frozen=True)
class Legacy:
    """One old argument: its replacement (None = no automatic mapping), where it goes now, and why."""

    new: str | None
    where: str
    note: str
    convert: Callable[[object, Mapping], object] | None = None
    deprecated: bool = False  # still accepted today (with a warning), removal announced


LEGACY_ARGS: dict[str, Legacy] = {
    "tokenizer": Legacy("processing_class", "SFTTrainer", "renamed: a trainer takes any processor, not only a tokenizer"),
    "max_seq_length": Legacy("max_length", "SFTConfig", "renamed and moved from SFTTrainer(...) to SFTConfig"),
    "dataset_text_field": Legacy("dataset_text_field", "SFTConfig", "moved from SFTTrainer(...) to SFTConfig"),
    "packing": Legacy("packing", "SFTConfig", "moved from SFTTrainer(...) to SFTConfig"),
    "dataset_num_proc": Legacy("dataset_num_proc", "SFTConfig", "moved from SFTTrainer(...) to SFTConfig"),
    "dataset_kwargs": Legacy("dataset_kwargs", "SFTConfig", "moved from SFTTrainer(...) to SFTConfig"),
    "use_auth_token": Legacy("token", "from_pretrained", "renamed; better: set HF_TOKEN in the environment"),
    "torch_dtype": Legacy("dtype", "from_pretrained", "renamed (torch_dtype= still works with a deprecation warning)",
                          deprecated=True),
    "load_in_4bit": Legacy("quantization_config", "from_pretrained",
                           "bare kwarg removed: pass BitsAndBytesConfig(load_in_4bit=True, ...)",
                           lambda v, d: _bnb_from(d, 4) if v else None),
    "load_in_8bit": Legacy("quantization_config", "from_pretrained",
                           "bare kwarg removed: pass BitsAndBytesConfig(load_in_8bit=True)",
                           lambda v, d: _bnb_from(d, 8) if v else None),
    "warmup_ratio": Legacy("warmup_steps", "SFTConfig", "merged into warmup_steps: a float < 1 is a fraction of the steps"),
    "evaluation_strategy": Legacy("eval_strategy", "SFTConfig", "renamed"),
    "gradient_checkpointing": Legacy("activation_checkpointing", "SFTConfig", "renamed (old name warns; removal in v6)",
                                     deprecated=True),
    "gradient_checkpointing_kwargs": Legacy("activation_checkpointing_kwargs", "SFTConfig",
                                            "renamed (old name warns; removal in v6)", deprecated=True),
    "no_cuda": Legacy("use_cpu", "SFTConfig", "renamed"),
    "per_gpu_train_batch_size": Legacy("per_device_train_batch_size", "SFTConfig", "renamed"),
    "per_gpu_eval_batch_size": Legacy("per_device_eval_batch_size", "SFTConfig", "renamed"),
    "push_to_hub_token": Legacy("hub_token", "SFTConfig", "renamed; better: HF_TOKEN in the environment"),
    "group_by_length": Legacy("train_sampling_strategy", "SFTConfig", "now one of the sampler strategies",
                              lambda v, d: "group_by_length" if v else "random"),
    "include_inputs_for_metrics": Legacy("include_for_metrics", "SFTConfig", "now a list of what to include",
                                         lambda v, d: ["inputs"] if v else []),
    "overwrite_output_dir": Legacy(None, "SFTConfig", (
        "removed (the Trainer never deleted output_dir). To continue from the last checkpoint pass "
        "resume_from_checkpoint=True to trainer.train() (TrainConfig.resume_from_checkpoint); to start over, use a new "
        "output_dir")),
    "logging_dir": Legacy(None, "SFTConfig", (
        "removed: set the TENSORBOARD_LOGGING_DIR environment variable (with report_to='tensorboard'); "
        "the default is output_dir/runs")),
    "save_safetensors": Legacy(None, "SFTConfig", "removed: checkpoints are always safetensors now; delete the argument"),
    "response_template": Legacy(None, "SFTTrainer", (
        "DataCollatorForCompletionOnlyLM is gone from TRL: use prompt/completion records and "
        "SFTConfig(completion_only_loss=True) (conversations: assistant_only_loss=True)")),
    "num_of_sequences": Legacy(None, "SFTConfig", "removed with the old packing: packing=True packs into max_length blocks"),
    "chars_per_token": Legacy(None, "SFTConfig", "removed with the old packing: packing=True packs into max_length blocks"),
}
_BNB_PREFIXES = ("bnb_4bit_", "llm_int8_")


def translate_legacy_args(args: Mapping) -> dict:
    """Map old-style arguments (the seed's era) to current names; raise LegacyArgumentError where there is no mapping.

    Arguments that are still current pass through unchanged. Bare `bnb_4bit_*` kwargs are folded into the
    `BitsAndBytesConfig` that replaces `load_in_4bit=True`. Giving an old name and its replacement together raises.
    """
    out: dict = {}
    has_load = any(k in args for k in ("load_in_4bit", "load_in_8bit"))
    for key, value in args.items():
        if key.startswith(_BNB_PREFIXES):
            if not has_load:
                raise LegacyArgumentError(f"{key!r} is not a from_pretrained() argument any more: put it inside "
                                          "quantization_config=BitsAndBytesConfig(...)")
            continue  # folded into the BitsAndBytesConfig below
        row = LEGACY_ARGS.get(key)
        if row is None or row.new == key:
            out[key] = value
            continue
        if row.new is None:
            raise LegacyArgumentError(f"{key!r} no longer exists ({row.where}): {row.note}")
        if row.new in args:
            raise LegacyArgumentError(f"both {key!r} (old) and {row.new!r} (its replacement) were given: keep only {row.new!r}")
        new_value = row.convert(value, args) if row.convert else value
        if new_value is None and row.convert:
            continue  # e.g. load_in_4bit=False: nothing to ask for
        out[row.new] = new_value
    return out


def route_args(args: Mapping) -> dict[str, dict]:
    """Group current argument names by where they go: from_pretrained, SFTTrainer, SFTConfig, LoraConfig."""
    import inspect

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dests = {  # first match wins: model-loading arguments go to from_pretrained even where TRL mirrors them
        "from_pretrained": {"token", "dtype", "quantization_config", "device_map", "trust_remote_code", "revision",
                            "attn_implementation", "low_cpu_mem_usage", "cache_dir", "local_files_only", "gguf_file"},
        "SFTTrainer": set(inspect.signature(SFTTrainer.__init__).parameters) - {"self", "args"},
        "SFTConfig": {f.name for f in dataclasses.fields(SFTConfig)},
        "LoraConfig": {f.name for f in dataclasses.fields(LoraConfig)},
    }
    out: dict[str, dict] = {k: {} for k in dests}
    for key, value in args.items():
        where = next((d for d, names in dests.items() if key in names), None)
        if where is None:
            every = sorted(set().union(*dests.values()))
            close = difflib.get_close_matches(key, every, n=3)
            raise LegacyArgumentError(f"{key!r} is not an argument of {', '.join(dests)}"
                                      + (f"; did you mean {close}?" if close else ""))
        out[where][key] = value
    return out


def legacy_table() -> list[dict]:
    """The old → new argument table (for notebooks and docs)."""
    return [{"old": k, "new": v.new or "— (no automatic mapping)", "where": v.where, "note": v.note}
            for k, v in LEGACY_ARGS.items()]


def check_kwargs(caller: str, kwargs: Mapping, hints: Mapping[str, str] | None = None) -> None:
    """Raise LegacyArgumentError if `kwargs` holds an old model-loading argument (a `from_pretrained` row of the table).

    `hints` adds the caller's own spelling of the replacement (e.g. load_model's quantization='nf4').
    """
    for key in kwargs:
        row = LEGACY_ARGS.get(key)
        if row is None or row.where != "from_pretrained" or row.new == key:
            continue
        hint = (hints or {}).get(key)
        raise LegacyArgumentError(f"{caller}: {key!r} is no longer accepted ({row.note}); use "
                                  + (f"{hint} or " if hint else "") + f"{row.new}=...")


__all__ = ["LEGACY_ARGS", "Legacy", "LegacyArgumentError", "check_kwargs", "legacy_table", "route_args",
           "translate_legacy_args"]
