"""helpers.train: config → SFTConfig/SFTTrainer, labels (completion only, EOS kept), gradient check, train()
end to end with resume and reload, adapters (model card, push). The memory planner: test_memory.py; old → new
arguments: test_compat.py; generation: test_evals.py."""

import dataclasses
import json
import warnings

import pytest
import torch

from helpers import data, env, evals, memory, models, train
from helpers.train import TrainConfig

ROOT = env.REPO_ROOT

# ------------------------------------------------------------------------------------------- fixtures


def task_ds(n, seed=0, split="train"):
    from datasets import Dataset

    recs = data.make_task_records(seed, n_train=n if split == "train" else 4, n_heldout=n if split == "heldout" else 4)
    return Dataset.from_list(recs[split])


def cfg_for(tmp_path, **kw):
    base = dict(model="tiny-phi", max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, lora_r=4,
                lora_alpha=8, lora_dropout=0.0, max_length=512, logging_steps=1, save_steps=1000,
                output_dir=str(tmp_path / "run"), warmup_steps=0)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------- config


def test_sft_config_is_explicit_and_quiet(tmp_path):
    cfg = cfg_for(tmp_path, max_length=192, activation_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc = train.sft_config(cfg, "cpu", "float32")
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert sc.max_length == 192 and sc.completion_only_loss is True and sc.packing is False
    assert sc.activation_checkpointing is False and sc.bf16 is False and sc.fp16 is False and sc.use_cpu is True
    assert sc.eval_strategy == "no" and sc.max_steps == 4 and sc.optim == "adamw_torch"
    assert sc.output_dir.endswith("run/checkpoints")
    on = train.sft_config(cfg_for(tmp_path, activation_checkpointing=True), "cpu", "float32")
    assert on.activation_checkpointing is True and on.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_trainconfig_from_dict_translates_and_rejects():
    cfg = TrainConfig.from_dict({"max_seq_length": 256, "batch_size": 2, "lr": 1e-4, "warmup_ratio": 0.1,
                                 "gradient_checkpointing": True})
    assert (cfg.max_length, cfg.per_device_train_batch_size, cfg.learning_rate) == (256, 2, 1e-4)
    assert cfg.warmup_steps == 0.1 and cfg.activation_checkpointing is True
    with pytest.raises(ValueError, match="did you mean.*max_steps"):
        TrainConfig.from_dict({"max_step": 3})
    with pytest.raises(ValueError, match="quantization"):
        TrainConfig(quantization="nf3")
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_report_to_is_none_by_default_selectable_and_checked(tmp_path, monkeypatch):
    import importlib.util

    import yaml

    assert train.sft_config(cfg_for(tmp_path), "cpu", "float32").report_to == []  # "none" → no tracker at all
    for recipe in sorted((ROOT / "configs").glob("sft_*.yaml")):
        assert TrainConfig.from_dict(yaml.safe_load(recipe.read_text())).report_to == "none", recipe.name
    with pytest.raises(ValueError, match="one of"):
        cfg_for(tmp_path, report_to="mlflw")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ValueError, match="pip install trackio"):
        cfg_for(tmp_path, report_to="trackio")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else real(name, *a))
    assert cfg_for(tmp_path, report_to="tensorboard").report_to == "tensorboard"


# ------------------------------------------------------------------------------------------- labels / EOS


@pytest.mark.slow
def test_labels_mask_prompt_and_keep_eos(tmp_path, tiny):
    model, tok = tiny
    pad_before = tok.pad_token
    assert pad_before is None or pad_before == tok.eos_token
    trainer = train.build_trainer(cfg_for(tmp_path), model, tok, task_ds(8))
    assert tok.pad_token == pad_before  # the caller's tokenizer is left as it was: the trainer pads with its own copy
    assert trainer.processing_class.pad_token == tok.eos_token  # Phi-style tokenizer: pad = eos
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = next(i for i, lab in enumerate(labels) if lab != -100)
    prompt_text = tok.decode(ids[:n_prompt])
    assert prompt_text.endswith("\nOutput:") and "Instruct: " in prompt_text  # no chat template → Phi-2 format
    assert all(lab == -100 for lab in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # EOS is trained
    # the collator pads labels with -100, so padding with the EOS id does not hide the real EOS
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for b in range(2):
        n = len(trainer.train_dataset[b]["input_ids"])
        assert batch["labels"][b, n - 1].item() == tok.eos_token_id
    # the old way (transformers' LM collator, labels = ids with pad → -100) masks EOS when pad = eos
    from transformers import DataCollatorForLanguageModeling

    old = DataCollatorForLanguageModeling(trainer.processing_class, mlm=False)([{"input_ids": ids}])
    assert old["labels"][0, -1].item() == -100


def test_text_records_warn_full_sequence_loss(tmp_path, tiny):
    from datasets import Dataset

    model, tok = tiny
    with pytest.warns(UserWarning, match="loss covers every token"):
        trainer = train.build_trainer(cfg_for(tmp_path), model, tok, Dataset.from_list([{"text": "a b c"}] * 4))
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id


def test_too_short_max_length_warns(tmp_path, tiny):
    model, tok = tiny
    with pytest.warns(UserWarning, match="longer than max_length=16: their end, EOS included, is cut off"):
        train.build_trainer(cfg_for(tmp_path, max_length=16), model, tok, task_ds(4))


def test_stale_targets_raise_before_training(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="match no module"):
        train.build_trainer(cfg_for(tmp_path, lora_targets=["Wqkv", "out_proj", "fc1", "fc2"]), model, tok, task_ds(4))


@pytest.mark.slow
def test_qlora_on_cpu_generate_then_train_keeps_gradients(tmp_path, tiny_dir):
    """The bitsandbytes CPU repack bug: generating with a 4-bit model before training must not starve LoRA."""
    model = models.load_model(str(tiny_dir), quantization="nf4", dtype="float32", device="cpu")
    tok = models.load_tokenizer(str(tiny_dir))
    recs = list(task_ds(2, split="heldout"))
    evals.evaluate_task(model, tok, recs, max_new_tokens=3)  # eval-mode generation first (evals.generate guards it)
    cfg = cfg_for(tmp_path, quantization="nf4", max_steps=1, per_device_train_batch_size=2)
    res = train.train(cfg, model=model, tokenizer=tok, train_ds=task_ds(4))
    report = res.metrics["gradient_check"]
    assert report["zero"] == [] and report["n_tensors"] == 2 * 6 * model.config.num_hidden_layers
    est = memory.estimate_memory(model, quantization="nf4", lora_r=4)  # a loaded 4-bit model: counted from its config
    assert est.assumptions["n_params"] == sum(p.numel() for p in models.load_model(str(tiny_dir)).parameters())


def test_eval_loop_refused_for_4bit_on_cpu(tmp_path, tiny_dir):
    model = models.load_model(str(tiny_dir), quantization="nf4", dtype="float32", device="cpu")
    tok = models.load_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError, match="repacks"):
        train.build_trainer(cfg_for(tmp_path, eval_steps=2), model, tok, task_ds(4), eval_ds=task_ds(4, split="heldout"))


# ------------------------------------------------------------------------------------------- gradient check


def test_gradient_check_callback_passes_and_catches(tiny):
    from peft import get_peft_model

    model, tok = tiny
    cfg = TrainConfig(lora_r=4, lora_dropout=0.0, lora_targets=["q_proj", "v_proj", "fc1"])
    peft_model = get_peft_model(model, train.lora_config(cfg, model))
    batch = tok(["Instruct: hi\nOutput: yes"], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    peft_model(**batch).loss.backward()
    cb = train.GradientCheckCallback()
    state = type("S", (), {"global_step": 0})()
    cb.on_pre_optimizer_step(None, state, None, model=peft_model)
    n_layers = model.config.num_hidden_layers
    assert cb.report["n_tensors"] == 2 * 3 * n_layers
    assert cb.report["zero"] == [] and cb.report["n_nonzero"] + len(cb.report["zero_expected"]) == cb.report["n_tensors"]
    # a layer whose LoRA gets no gradient (what a frozen path or a stale name looks like) must stop training
    for name, p in peft_model.named_parameters():
        if "layers.0.self_attn.q_proj.lora_B" in name:
            p.grad.zero_()
    with pytest.raises(RuntimeError, match="received no gradient"):
        train.GradientCheckCallback().on_pre_optimizer_step(None, state, None, model=peft_model)


# ------------------------------------------------------------------------------------------- train() end to end


@pytest.mark.slow
def test_train_end_to_end_resume_and_reload(tmp_path, tiny):
    model, tok = tiny
    held = task_ds(6, split="heldout")
    cfg = cfg_for(tmp_path, max_steps=6, save_steps=3, eval_steps=3, eval_samples=3, max_new_tokens=8,
                  learning_rate=1e-2)
    res = train.train(cfg, model=model, tokenizer=tok, train_ds=task_ds(48), eval_ds=held)
    out = tmp_path / "run"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and len(m["loss_history"]["loss"]) >= 6
    assert m["final_loss"] < m["first_loss"]  # loss falls
    assert m["gradient_check"]["zero"] == [] and m["gradient_check"]["step"] == 1
    assert m["train_tokens"] > 0 and m["tokens_per_second"] > 0 and m["peak_memory"]["peak_bytes"] > 0
    assert set(m["task_before"]) == {"n", "parsed", "schema_valid", "exact_match", "field_accuracy"}
    assert m["task_after"]["n"] == 3 and "eval_loss" in m["eval"]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["device"] == "cpu" and "transformers" in env_json["versions"]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "train_config.json").read_text())["max_steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # reload: the saved adapter reproduces the trained model's logits and generations
    reloaded, tok2 = train.load_trained(adapter, model=str(models.build_tiny_phi()))
    ids = tok(["Instruct: turn on the lamp\nOutput:"], return_tensors="pt")
    res.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.model(**ids).logits, reloaded(**ids).logits)
    prompts = [data.format_prompt(p, tok) for p, _ in map(data.split_record, list(held)[:2])]
    assert evals.generate(res.model, tok, prompts, 6) == evals.generate(reloaded, tok2, prompts, 6)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, res.model(**ids).logits, rtol=1e-4, atol=1e-4)

    # resume: continue the same run to 8 steps from its last checkpoint
    cfg2 = dataclasses.replace(cfg, max_steps=8, resume_from_checkpoint=True, eval_samples=0)
    fresh = models.load_model(str(models.build_tiny_phi()), dtype="float32", device="cpu")
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        ran = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ran.append(state.global_step)

    res2 = train.train(cfg2, model=fresh, tokenizer=tok, train_ds=task_ds(48), eval_ds=None, callbacks=[CountSteps()])
    assert res2.trainer.state.global_step == 8 and CountSteps.ran == [7, 8]  # only the new steps ran
    assert res2.metrics["loss_history"]["step"][:6] == m["loss_history"]["step"][:6]  # history carried over


def test_model_card_and_push_skips_with_a_reason(tmp_path, monkeypatch):
    card = train.model_card("microsoft/phi-2", {"quantization": "nf4", "lora_r": 32, "unrelated": 1},
                            {"exact_match": 0.85})
    assert card.startswith("---\nlibrary_name: peft\nbase_model: microsoft/phi-2") and "- lora_r: 32" in card
    assert "exact_match: 0.85" in card and "unrelated" not in card
    assert train.push_adapter(tmp_path, "", card).startswith("skipped: PUSH_TO_HUB is empty")
    monkeypatch.setattr(train.env, "hf_token", lambda: None)
    assert "no Hugging Face token" in train.push_adapter(tmp_path, "me/x", card)
    monkeypatch.setattr(train.env, "hf_token", lambda: "hf_fake")
    monkeypatch.setattr(train.env, "hub_reachable", lambda: False)
    assert "unreachable" in train.push_adapter(tmp_path, "me/x", card)
    assert not (tmp_path / "README.md").exists()                 # nothing written when skipped
