"""causal_lm_loss (labelled positions only, in chunks) against transformers' own loss, and in AdapterTrainer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainingArguments

import deltatune as dt
from deltatune.loss import backbone_and_head, causal_lm_loss
from deltatune.train.trainer import AdapterTrainer, Collator, ListDataset
from tests.conftest import VOCAB, make_model, quiet


def batch(kind: str = "llama", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 9), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, 7:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask, labels


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("num_items", [None, 11])
def test_loss_and_gradients_equal_transformers(kind, chunk_size, num_items):
    model = make_model(kind)
    ids, mask, labels = batch(kind)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    hidden_ref = {}
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: hidden_ref.update(h=args[0]))
    want = model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
    grads_want = torch.autograd.grad(want, [hidden_ref["h"], model.get_output_embeddings().weight])
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    got = causal_lm_loss(hidden, head, labels, num_items_in_batch=num_items, chunk_size=chunk_size)
    grads = torch.autograd.grad(got, [hidden, head.weight])
    assert torch.allclose(got, want, rtol=1e-6)
    for g, w in zip(grads, grads_want, strict=True):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_gradcheck_with_bias_and_no_labelled_token():
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(4, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 2] = -100
    assert torch.autograd.gradcheck(lambda h, w, b: causal_lm_loss(h, _Head(w, b), labels, chunk_size=3),
                                    (hidden, head.weight, head.bias))
    none = torch.full((2, 5), -100)
    loss = causal_lm_loss(hidden, head, none)
    assert loss.item() == 0.0 and torch.isfinite(loss)


class _Head(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias


def test_bf16_autocast_is_close_to_transformers():
    model = make_model("llama")
    ids, mask, labels = batch()
    backbone, head = backbone_and_head(model)
    with torch.autocast("cpu", torch.bfloat16):
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = causal_lm_loss(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, head, labels)
    assert abs(got.item() - want.item()) < 2e-2 * want.item()


def test_bad_shapes_and_chunk_size_are_refused():
    head = torch.nn.Linear(4, 7)
    with pytest.raises(ValueError, match="hidden_states must be"):
        causal_lm_loss(torch.randn(2, 5, 4), head, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="head's weight"):
        causal_lm_loss(torch.randn(2, 5, 3), head, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(torch.randn(2, 5, 4), head, torch.zeros(2, 5, dtype=torch.long), chunk_size=0)


def test_prompt_learning_and_unknown_heads_take_the_models_own_loss():
    prompt = quiet(dt.get_peft_model, make_model("llama"),
                   dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert backbone_and_head(prompt) is None
    assert backbone_and_head(make_model("t5")) is None
    lora = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    backbone, head = backbone_and_head(lora)
    assert head is lora.get_base_model().lm_head


def train(label_positions_loss: bool, tmp_path, grad_accum: int = 2) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(r=4, target_modules="all-linear",
                                                                        init_lora_weights=False))
    rows = []
    for seed in range(8):
        ids, _, labels = batch(seed=seed)
        rows.append({"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1],
                     "labels": labels[seed % 2].tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=grad_accum, max_steps=3, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_drop_last=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=ListDataset(rows), data_collator=Collator(0))
    trainer.label_positions_loss = label_positions_loss
    quiet(trainer.train)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_adapter_trainer_steps_equal_the_models_own_loss(tmp_path, grad_accum, monkeypatch):
    from deltatune.train import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "causal_lm_loss", lambda *a, **k: calls.append(1) or causal_lm_loss(*a, **k))
    losses_on, weights_on = train(True, tmp_path / "on", grad_accum)
    assert len(calls) == 3 * grad_accum  # every micro-batch took the labelled-positions loss
    losses_off, weights_off = train(False, tmp_path / "off", grad_accum)
    assert len(losses_on) == 3 and losses_on == pytest.approx(losses_off, rel=1e-5)
    for key, value in weights_off.items():
        assert torch.allclose(weights_on[key], value, atol=1e-5), key


def test_adapter_trainer_runs_the_backbone_under_the_runs_autocast(tmp_path):
    """accelerate's mixed precision wraps the model's forward; the labelled-positions path must use it too."""
    model = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda m, args, out: seen.append(torch.is_autocast_enabled("cpu")))
    ids, mask, labels = batch()
    rows = [{"input_ids": ids[i].tolist(), "attention_mask": [1] * 9, "labels": labels[0].tolist()} for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, bf16=True,
                             save_strategy="no", report_to=[], use_cpu=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=ListDataset(rows), data_collator=Collator(0))
    trainer.label_positions_loss = True
    quiet(trainer.train)
    assert seen and all(seen)


@pytest.mark.parametrize("bound", [96, 4])
def test_short_rows_take_the_math_attention_kernel_with_the_same_steps(tmp_path, bound):
    """Rows of at most ``math_attention_up_to`` tokens run PyTorch's math attention on a CPU (flash disabled around
    the forward); the training itself is the same as with the default kernel."""
    import torch.nn.functional as F

    seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return original(*args, **kwargs)

    model = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.get_base_model().config._attn_implementation = "sdpa"
    ids, _, labels = batch()
    rows = [{"input_ids": ids[i].tolist(), "attention_mask": [1] * 9, "labels": labels[0].tolist()} for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             save_strategy="no", report_to=[], use_cpu=True, learning_rate=1e-2, logging_steps=1)
    results = {}
    for kernel_bound in (bound, 0):
        torch.manual_seed(0)
        trained = copy.deepcopy(model)
        trainer = AdapterTrainer(model=trained, args=args, train_dataset=ListDataset(rows), data_collator=Collator(0))
        trainer.math_attention_up_to = kernel_bound
        seen.clear()
        F.scaled_dot_product_attention = spy
        try:
            quiet(trainer.train)
        finally:
            F.scaled_dot_product_attention = original
        assert seen and all(enabled == (kernel_bound < 9) for enabled in seen)  # 9 tokens per row here
        results[kernel_bound] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert results[bound] == pytest.approx(results[0], rel=1e-5)
