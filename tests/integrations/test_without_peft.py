"""transformers.Trainer with a deltatune model where HF PEFT is not installed (a user who switched for good)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

SCRIPT = r'''
import importlib.abc, importlib.util, os, sys, warnings
class NoPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("peft is not installed (blocked for this test)")
sys.meta_path.insert(0, NoPeft())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "peft" else _find_spec(name, *a, **k)
warnings.filterwarnings("ignore")
import datasets, torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import is_peft_available
assert not is_peft_available()
import deltatune
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
model = deltatune.get_peft_model(model, deltatune.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
ids = torch.randint(2, 96, (16, 10)).tolist()
data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "note": ["x"] * 16})
out = sys.argv[1]
trainer = Trainer(model=model, args=TrainingArguments(out, max_steps=2, save_steps=2, per_device_train_batch_size=4,
                                                      report_to="none", eval_strategy="steps", eval_steps=2),
                  train_dataset=data, eval_dataset=data)
trainer.train()
assert any("eval_loss" in entry for entry in trainer.state.log_history)
print(sorted(os.listdir(os.path.join(out, "checkpoint-2"))))
'''


def test_trainer_saves_adapter_checkpoints_without_peft_installed(tmp_path):
    script = tmp_path / "no_peft.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-3000:]
    files = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files
