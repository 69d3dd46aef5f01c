"""``transformers.Trainer`` taught to checkpoint a deltatune adapter, and to stop when training diverges.

Our ``PeftModel`` is a plain ``nn.Module``, so Trainer would save (and on resume, look for) the
whole model's weights. ``AdapterTrainer`` writes only the adapter, in PEFT's layout, into each
checkpoint, and on ``--resume`` loads it back; optimizer, scheduler, RNG and data position come
from Trainer's own checkpoint files (all read with ``weights_only=True``), so a resumed run ends
at the same adapter as an uninterrupted one. A checkpoint cut short (a crash or a full disk while it
was written) is found before resuming, and the one before it is used instead.

``StopOnNonFinite`` ends training at the first NaN or Inf loss, gradient norm or adapter weight,
before that step's checkpoint is written, so every checkpoint on disk holds finite weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import read_config_dict
from ..formats.peft import load_adapter_tensors, non_finite_keys, read_adapter_weights
from ..loss import backbone_and_head, causal_lm_loss
from ..model import PeftModel
from ..optim import create_loraplus_optimizer
from .evaluate import collate
from .task import BUILTIN_STEPS


class AdapterTrainer(Trainer):
    """Trainer whose checkpoints hold the adapter only (PEFT files), not the base model."""

    loraplus_ratio: float | None = None  # LoRA+ (``deltatune.create_loraplus_optimizer``): B trains at lr x this
    # the loss from the labelled positions only, in chunks (``deltatune.loss``): 0.79x the main job's training time
    label_positions_loss: bool = True
    # rows of at most this many tokens take PyTorch's math attention kernel on a CPU (see `_attention_kernel`)
    math_attention_up_to: int = 96

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple:
        """Trainer's loss; for a causal LM whose head is plain, :func:`deltatune.loss.causal_lm_loss` on the
        backbone's hidden states: the same value, without the (tokens x vocab) logits of every position.

        Anything else Trainer does differently (outputs asked for, label smoothing, a custom loss, a model wrapped
        for distributed training, whose gradient sync needs its own forward) takes Trainer's path."""
        with self._attention_kernel(inputs):
            return self._loss(model, inputs, return_outputs, num_items_in_batch)

    def _attention_kernel(self, inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
        """PyTorch's math attention for short rows on a CPU, its default (flash) kernel otherwise.

        Why: on a CPU the flash kernel's backward is slow for short rows; at the main job's 4 x 82 tokens the math
        kernel made a whole micro-batch 0.87x as long, at 128 tokens they were even and at 256 it was 1.1x slower
        (and keeps the rows' attention weights, rows x heads x tokens^2, for backward), hence the bound.
        """
        ids = inputs.get("input_ids")
        if ids is None or ids.device.type != "cpu" or ids.shape[-1] > self.math_attention_up_to:
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.MATH])

    def _loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool,
              num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | tuple:
        parts = None
        if (self.label_positions_loss and not return_outputs and "labels" in inputs and self.label_smoother is None
                and self.compute_loss_func is None and model is self._peft_model()):
            parts = backbone_and_head(model)
        if parts is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        backbone, head = parts
        labels = inputs["labels"]
        count = num_items_in_batch if self.model_accepts_loss_kwargs else None
        with self.accelerator.autocast():  # accelerate's mixed precision wraps the model's forward, not the backbone
            hidden = backbone(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).last_hidden_state
            loss = causal_lm_loss(hidden, head, labels, num_items_in_batch=count)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and count is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer scales its loss
        return loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer (its class and settings from the arguments); with ``loraplus_ratio``, in LoRA+'s
        parameter groups."""
        if self.loraplus_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
        self.optimizer = create_loraplus_optimizer(self.model if model is None else model, optimizer_cls,
                                                   lr=kwargs.pop("lr"), loraplus_lr_ratio=self.loraplus_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

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
        self.close()

    def close(self) -> None:
        """End the bar (also when training stops with an error, so the message starts on a line of its own)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NonFiniteTrainingError(ValueError):
    """The loss, the gradient norm or an adapter weight became NaN or Inf: training cannot recover from it."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training stopped at step {step}: {what}")
        self.step, self.what = step, what


class StopOnNonFinite(TrainerCallback):
    """Raise :class:`NonFiniteTrainingError` as soon as the loss, the gradient norm or a trainable weight is NaN/Inf.

    Trainer calls ``on_step_end`` (weights after the optimizer step), then ``on_log`` (that step's loss and
    gradient norm), then saves a checkpoint, so the step that went wrong never reaches disk. Every process
    of a distributed run sees the same averaged loss and the same synchronised weights, so all stop together.
    Without this, the run goes on with NaN weights and (with Trainer's default NaN filter) logs a loss of 0.
    """

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        if model is None:
            return
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if params and not bool(torch.stack([p.detach().isfinite().all() for _, p in params]).all()):
            bad = non_finite_keys({name: p for name, p in params})
            raise NonFiniteTrainingError(state.global_step, f"{len(bad)} adapter weight tensor(s) became NaN or "
                                         f"Inf (first: {bad[0]})")

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        for key, label in (("loss", "the training loss"), ("grad_norm", "the gradient norm")):
            value = (logs or {}).get(key)
            if isinstance(value, float | int) and not math.isfinite(value):
                raise NonFiniteTrainingError(state.global_step, f"{label} became {value}")


class Collator:
    """Right-pads a list of tokenized rows into tensors (labels padded with -100)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)


class PackingCollator(DataCollatorWithFlattening):
    """Padding-free batches (``--packing``): transformers' flattening collator, which joins the rows into one
    sequence with position ids restarting at each row and -100 as each row's first label; transformers' attention
    masks keep each row to itself when position ids restart and no attention mask is given."""

    def __init__(self) -> None:
        super().__init__(return_position_ids=True, separator_id=-100)

    def __call__(self, rows: list[dict[str, list[int]]], return_tensors: str | None = None) -> dict[str, Any]:
        return super().__call__([{k: r[k] for k in ("input_ids", "labels")} for r in rows], return_tensors)


@torch.no_grad()
def packing_keeps_rows_apart(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention keeps packed rows apart: the logits of a row after another one in a packed
    sequence equal that row's logits alone. An attention that builds its mask without the position ids would let
    packed rows attend to each other; ``--packing`` checks this once before training."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([[3, 5, 7, 4, 6, 8, 9]])
        packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), use_cache=False).logits
        alone = model(input_ids=ids[:, 3:], use_cache=False).logits
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed[0, 3:], alone[0], atol=1e-4, rtol=1e-3))


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
        logging_nan_inf_filter=False,  # a NaN loss must show as NaN (and stop the run), not be logged as 0
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
    found = _checkpoints(checkpoint_dir)
    return found[0] if found else None


def _checkpoints(checkpoint_dir: str) -> list[str]:
    """Checkpoint folders with a trainer_state.json (Trainer writes it last), newest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit() \
                and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(step), path))
    return [path for _, path in sorted(found, reverse=True)]


TRAINER_STATE = "trainer_state.json"
NEEDED = ("optimizer.pt", "scheduler.pt")  # without them Trainer would silently restart the schedule


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be resumed from (a file missing, cut short or holding NaN), or None when it is whole.

    Every file is read the way resuming reads it (tensors with ``weights_only=True``): a torn write shows up
    as an unreadable file, and finding it here lets ``--resume`` fall back to the checkpoint before.
    """
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
            if not isinstance(json.load(fh), dict):
                return f"{TRAINER_STATE} does not hold a JSON object"
        read_config_dict(path)
        bad = non_finite_keys(read_adapter_weights(path))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return " ".join(str(err).split())
    if bad:
        return f"its adapter holds NaN or Inf ({bad[0]})"
    missing = [name for name in NEEDED if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in sorted(os.listdir(path)):
        if name.endswith((".pt", ".pth")):
            try:
                with safe_globals():  # the numpy types of the RNG state, as Trainer allows them when resuming
                    torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file; all mean "unusable"
                return f"{name} is unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def resumable_checkpoint(checkpoint_dir: str, say: Callable[[str], None] = print) -> str:
    """The newest checkpoint in ``checkpoint_dir`` that can be resumed from, saying which newer ones are not.

    A damaged checkpoint is left where it is: the resumed run writes that step's checkpoint into the same
    folder again, file by file, and the final cleanup removes it with the others.

    Raises:
        FileNotFoundError: no checkpoint at all.
        ValueError: none is usable; says why for each.
    """
    found = _checkpoints(checkpoint_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint found in {checkpoint_dir}.")
    damaged = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            for old, why in damaged:
                say(f"{old} is incomplete or damaged ({why}); resuming from {path} instead.")
            return path
        damaged.append((path, problem))
    reasons = "; ".join(f"{os.path.basename(path)}: {why}" for path, why in damaged)
    raise ValueError(f"--resume: no usable checkpoint in {checkpoint_dir} ({reasons}). Start the run again with "
                     "--overwrite (it replaces them), or choose another --output.")


def frozen_linear_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen float weights of the ``nn.Linear`` layers LoRA wraps in ``dtype`` (the autocast dtype of a
    bf16 run); returns how many were converted.

    Why: autocast keeps its cast copies only of trainable leaf tensors, so a frozen fp32 weight is cast to bf16 again
    at every call, in forward and again in backward: about 1.1 GB of memory traffic per micro-batch on
    SmolLM2-135M. Cast once here, every product sees the same bf16 values autocast would have made (both round to
    nearest even), and the frozen weights take half the memory. Only for plain LoRA: DoRA's weight norm, and PiSSA /
    OLoRA / LoftQ's conversion of the adapter back to plain LoRA, read the float base weight.
    """
    from ..methods.lora import LoraLayer

    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # a tied lm_head
    converted = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or type(module.base_layer) is not torch.nn.Linear:
            continue
        weight = module.base_layer.weight
        if weight.requires_grad or not weight.is_floating_point() or weight.dtype == dtype or id(weight) in shared:
            continue
        weight.data = weight.data.to(dtype)
        converted += 1
    return converted
