"""Plain ``transformers.Trainer`` with a deltatune PeftModel, side by side with HF PEFT on the same tiny models.

Default TrainingArguments (remove_unused_columns=True, safetensors checkpoints), for causal LM (tied
embeddings), sequence classification, token classification and question answering.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
)
from transformers import trainer_utils as hf_trainer_utils

import deltatune

from .twins import arguments, eval_losses, losses, token_dataset, twins

VOCAB = 96


def tied_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def bert_config(**kwargs) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kwargs)


def labels_as_ids(ids, generator):
    return ids.tolist()


TASKS = {
    # task: (make base model, LoraConfig kwargs, extra dataset columns, head module name or None)
    "CAUSAL_LM": (tied_llama, {"target_modules": "all-linear"}, {"labels": labels_as_ids}, None),
    "SEQ_CLS": (lambda: BertForSequenceClassification(bert_config(num_labels=3)), {},
                {"labels": lambda ids, g: torch.randint(0, 3, (len(ids),), generator=g).tolist(),
                 "token_type_ids": lambda ids, g: torch.zeros_like(ids).tolist()}, "classifier"),
    "TOKEN_CLS": (lambda: BertForTokenClassification(bert_config(num_labels=4)), {},
                  {"labels": lambda ids, g: torch.randint(0, 4, ids.shape, generator=g).tolist()}, "classifier"),
    "QUESTION_ANS": (lambda: BertForQuestionAnswering(bert_config()), {},
                     {"start_positions": lambda ids, g: torch.randint(0, 5, (len(ids),), generator=g).tolist(),
                      "end_positions": lambda ids, g: torch.randint(5, 10, (len(ids),), generator=g).tolist()},
                     "qa_outputs"),
}


def adapter_files(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("task", list(TASKS))
def test_trainer_with_default_arguments_matches_peft(task, tmp_path):
    make_base, lora_kwargs, columns, head = TASKS[task]
    config = deltatune.LoraConfig(task_type=task, r=4, lora_alpha=8, **lora_kwargs)
    ours, theirs = twins(make_base, config, tmp_path)
    assert type(ours).__name__ == type(theirs).__name__  # PeftModelForCausalLM, ...
    data = token_dataset(**columns, unused_text=lambda ids, g: ["not a model input"] * len(ids))
    head_before = ours.get_base_model().get_submodule(head).modules_to_save["default"].weight.clone() if head else None

    runs = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        # SGD: AdamW's m / sqrt(v) turns float noise in near-zero gradients into full-size steps
        trainer = Trainer(model=model, args=arguments(tmp_path / name, optim="sgd", learning_rate=0.2),
                          train_dataset=data, eval_dataset=data)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        runs[name] = trainer

    torch.testing.assert_close(losses(runs["ours"]), losses(runs["peft"]), rtol=1e-4, atol=1e-5)
    assert len(eval_losses(runs["ours"])) == 2  # eval_loss is reported (label names were found)
    torch.testing.assert_close(eval_losses(runs["ours"]), eval_losses(runs["peft"]), rtol=1e-4, atol=1e-5)
    assert losses(runs["ours"])[-1] != losses(runs["ours"])[0]
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        ours_dir, peft_dir = tmp_path / "ours" / folder, tmp_path / "peft" / folder
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ours_dir))
        assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(ours_dir))  # no base weights
        mine, reference = adapter_files(ours_dir), adapter_files(peft_dir)
        assert mine.keys() == reference.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5)
    if head is not None:  # the task's head trained, as in PEFT
        head_after = ours.get_base_model().get_submodule(head).modules_to_save["default"].weight
        assert not torch.allclose(head_before, head_after)
        assert f"base_model.model.{head}.weight" in adapter_files(tmp_path / "ours" / "final")


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    config = deltatune.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=8)
    data = token_dataset(labels=labels_as_ids)
    ours, _ = twins(tied_llama, config, tmp_path)
    Trainer(model=ours, args=arguments(tmp_path / "full", eval_strategy="no"), train_dataset=data).train()
    full = {k: v.detach().clone() for k, v in deltatune.get_peft_model_state_dict(ours).items()}

    torch.manual_seed(0)
    base = tied_llama()  # the same base weights as in twins()
    torch.manual_seed(123)  # another initial adapter: the resume must replace it with the checkpoint's
    fresh = deltatune.get_peft_model(base, deltatune.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                                                               r=4, lora_alpha=8, init_lora_weights="gaussian"))
    trainer = Trainer(model=fresh, args=arguments(tmp_path / "resumed", eval_strategy="no"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    resumed = deltatune.get_peft_model_state_dict(fresh)
    assert resumed.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_loads_the_adapter_back(tmp_path):
    config = deltatune.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4)
    ours, _ = twins(tied_llama, config, tmp_path)
    data = token_dataset(labels=labels_as_ids)
    trainer = Trainer(model=ours, args=arguments(tmp_path / "run", load_best_model_at_end=True),
                      train_dataset=data, eval_dataset=data)
    trainer.train()
    best = adapter_files(trainer.state.best_model_checkpoint)
    now = deltatune.get_peft_model_state_dict(ours)
    for key in best:
        torch.testing.assert_close(now[key], best[key])


def test_peft_models_behave_as_before_in_the_same_process(tmp_path):
    """deltatune's patches answer for deltatune objects only."""
    import peft

    plain = tied_llama()
    peft_model = peft.get_peft_model(tied_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    ours = deltatune.get_peft_model(tied_llama(), deltatune.LoraConfig(target_modules=["q_proj"]))
    assert hf_trainer_utils._is_peft_model(peft_model) is True
    assert hf_trainer_utils._is_peft_model(ours) is True
    assert hf_trainer_utils._is_peft_model(plain) is False
    from accelerate.utils import is_peft_model

    assert is_peft_model(peft_model) and is_peft_model(ours) and not is_peft_model(plain)
    # a plain model is still saved whole by Trainer
    trainer = Trainer(model=plain, args=arguments(tmp_path / "plain", max_steps=1, eval_strategy="no"),
                      train_dataset=token_dataset(labels=labels_as_ids))
    trainer.save_model(str(tmp_path / "plain" / "final"))
    assert "model.safetensors" in os.listdir(tmp_path / "plain" / "final")


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from integrations.twins import arguments, token_dataset
from integrations.test_trainer import tied_llama, labels_as_ids
import deltatune
from transformers import Trainer
torch.manual_seed(0)
model = deltatune.get_peft_model(tied_llama(), deltatune.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                                                                   r=4, init_lora_weights="gaussian"))
args = arguments({out!r}, per_device_train_batch_size={batch}, eval_strategy="no", save_steps=100, max_steps=3,
                 ddp_backend="gloo", use_cpu=True)
Trainer(model=model, args=args, train_dataset=token_dataset(labels=labels_as_ids)).train()
if args.process_index == 0:
    model.save_pretrained({out!r} + "/final")
if torch.distributed.is_initialized():  # a gloo worker left running at exit can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def test_ddp_with_torchrun_matches_one_process(tmp_path):
    """2 processes x batch 2 give the adapter that 1 process x batch 4 gives (same global batches)."""
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    results = {}
    for name, procs, batch in (("ddp", 2, 2), ("single", 1, 4)):
        script = tmp_path / f"{name}.py"
        script.write_text(DDP_SCRIPT.format(tests=tests_dir, out=str(tmp_path / name), batch=batch))
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                              "--master_port", str(29600 + procs), str(script)],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = adapter_files(tmp_path / name / "final")
    assert results["ddp"].keys() == results["single"].keys()
    for key in results["single"]:
        torch.testing.assert_close(results["ddp"][key], results["single"][key], rtol=1e-4, atol=1e-5)
