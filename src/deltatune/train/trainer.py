"""``transformers.Trainer`` taught to checkpoint a deltatune adapter.

Our ``PeftModel`` is a plain ``nn.Module``, so Trainer would save (and on resume, look for) the
whole model's weights. ``AdapterTrainer`` writes only the adapter, in PEFT's layout, into each
checkpoint, and on ``--resume`` loads it back; optimizer, scheduler, RNG and data position come
from Trainer's own checkpoint files (all read with ``weights_only=True``), so a resumed run ends
at the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..formats.peft import load_adapter_tensors, read_adapter_weights
from ..model import PeftModel
from .evaluate import collate
from .task import BUILTIN_STEPS


class AdapterTrainer(Trainer):
    """Trainer whose checkpoints hold the adapter only (PEFT files), not the base model."""

    def _peft_model(self) -> PeftModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            raise TypeError(f"AdapterTrainer trains a deltatune PeftModel, got {type(model).__name__}.")
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self._peft_model().save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = self._peft_model()
        name = peft_model.active_adapter
        weights = read_adapter_weights(resume_from_checkpoint)
        missing, _ = load_adapter_tensors(peft_model, peft_model.peft_config[name], name, weights)
        if missing:
            raise ValueError(f"Checkpoint {resume_from_checkpoint} lacks adapter tensors {missing[:3]}...; "
                             "was it written by another run configuration?")


class LossProgress(TrainerCallback):
    """One progress bar for the optimizer steps, showing the latest training loss (main process only)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.1e}")

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Collator:
    """Right-pads a list of tokenized rows into tensors (labels padded with -100)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)


class ListDataset(torch.utils.data.Dataset):
    """The tokenized rows as a map-style dataset (Trainer shuffles it with its seeded sampler)."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def training_arguments(checkpoint_dir: str, settings: Any, use_cpu: bool) -> TrainingArguments:
    """Trainer settings from a ``TrainConfig``: constant choices here, user choices from ``settings``."""
    return TrainingArguments(
        output_dir=checkpoint_dir,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps > 0 else (-1 if settings.data else BUILTIN_STEPS),
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        save_only_model=False,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        bf16=settings.use_bf16,
        dataloader_num_workers=0,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
    )


def last_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest complete checkpoint folder (one whose trainer_state.json was written), or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    found = []
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit() \
                and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(step), path))
    return max(found)[1] if found else None
