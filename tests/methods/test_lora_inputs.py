"""The fused LoRA/DoRA nodes rebuild an adapted layer's input in backward from factors autograd keeps anyway
(methods/lora_inputs.py): same gradients bit for bit, fewer bytes kept, and the cases that must keep the input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
import deltatune.methods.lora_fused as lora_fused
from deltatune.adapter_layer import adapter_layers
from deltatune.analysis import saved_tensor_bytes
from deltatune.methods import lora_inputs
from deltatune.methods.lora import LoraLayer
from tests.conftest import make_model, model_inputs, perturb


def _training_layer(in_features: int, out_features: int, bias: bool = True, use_dora: bool = False) -> LoraLayer:
    """A frozen nn.Linear with one active rank-2 adapter "a" (B random), in training mode: the fused path."""
    layer = LoraLayer(nn.Linear(in_features, out_features, bias=bias).requires_grad_(False))
    layer.add_adapter("a", r=2, lora_alpha=2, init_lora_weights=False, use_dora=use_dora)
    layer.active_adapters = ["a"]
    return layer.train()


def _step(use_dora: bool, rebuild: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    if not rebuild:
        monkeypatch.setattr(lora_fused, "rebuildable_input", lambda x: None)
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(target_modules="all-linear", r=4,
                                                                  use_dora=use_dora))
    perturb(model)
    model.train()
    inputs = model_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    saved = saved_tensor_bytes(loss, exclude=model)
    loss.backward()
    monkeypatch.undo()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, saved


@pytest.mark.parametrize("use_dora", [False, True])
def test_rebuilt_inputs_give_the_same_gradients_and_keep_fewer_bytes(use_dora, monkeypatch):
    rebuilt, rebuilt_bytes = _step(use_dora, True, monkeypatch)
    kept, kept_bytes = _step(use_dora, False, monkeypatch)
    assert rebuilt.keys() == kept.keys()
    for name, grad in rebuilt.items():
        assert torch.equal(grad, kept[name]), name
    # 3 x 7 tokens, fp32: block 1's two RMSNorm outputs (32 wide) and MLP product (48 wide), block 0's second norm
    # and MLP product (its first norm reads the embeddings, which need no gradient: no product graph to rebuild from)
    assert kept_bytes - rebuilt_bytes == 21 * 4 * ((32 + 32 + 48) + (32 + 48))


def test_which_llama_inputs_are_rebuilt():
    """q/k/v and gate/up read an RMSNorm output, down_proj the MLP product: rebuilt; o_proj reads a view of the
    attention output (which attention keeps anyway): kept."""
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(target_modules="all-linear", r=4))
    model.train()
    structures = {}

    def record(module, args, output):
        structures[module.name] = output.grad_fn.input_structure is not None

    for name, layer in adapter_layers(model):
        if ".layers.1." in name:  # layer 0 reads the embeddings, which need no gradient: no product graph
            layer.name = name.rsplit(".", 1)[-1]
            layer.register_forward_hook(record)  # on the LoRA layer: the fused path looks at its base's hooks
    model(**model_inputs("llama"))
    assert structures == {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False, "gate_proj": True,
                          "up_proj": True, "down_proj": True}


def _spy_on_rebuilds(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Every input a fused node's backward takes, with the identity of the RebuiltInput it came from."""
    taken = []
    real_take = lora_inputs.RebuiltInput.take

    def take(self, leaves, features, dtype):
        value = real_take(self, leaves, features, dtype)
        taken.append((id(self), value, self))
        return value

    monkeypatch.setattr(lora_inputs.RebuiltInput, "take", take)
    return taken


@pytest.mark.parametrize("bf16", [False, True])
def test_layers_reading_one_input_share_one_rebuild(bf16, monkeypatch):
    """q/k/v read one RMSNorm output and gate/up another: each is rebuilt once in backward (under bf16 autocast:
    and cast once), handed to the other readers, and let go by the last one; the gradients are those of the kept
    inputs, bit for bit."""
    taken = _spy_on_rebuilds(monkeypatch)
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(target_modules="all-linear", r=4))
    perturb(model)
    model.train()
    inputs = model_inputs("llama")

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    shared = gradients()
    with monkeypatch.context() as patch:
        patch.setattr(lora_fused, "rebuildable_input", lambda x: None)
        kept = gradients()
    for name, grad in shared.items():
        assert torch.equal(grad, kept[name]), name
    by_source: dict[int, list] = {}
    for source, value, handle in taken:
        by_source.setdefault(source, []).append((value, handle))
    # block 0: gate/up, down_proj; block 1: q/k/v, gate/up, down_proj (block 0's q/k/v read the embeddings)
    assert sorted(len(v) for v in by_source.values()) == [1, 1, 2, 2, 3]
    for values in by_source.values():
        assert all(value is values[0][0] for value, _ in values)  # the same tensor, not rebuilt again
        assert values[0][0].dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert values[0][1]._value is None and values[0][1].readers == 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_shared_rebuilds_with_a_frozen_reader_and_a_retained_graph(use_dora, monkeypatch):
    """A reader whose A is frozen skips the input and still lets it go; a second backward over a retained graph
    rebuilds it (DoRA: also to recompute u) and gives the same gradients."""
    taken = _spy_on_rebuilds(monkeypatch)
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(target_modules="all-linear", r=4,
                                                                  use_dora=use_dora))
    perturb(model)
    model.train()
    for name, param in model.named_parameters():
        if "k_proj.lora_A" in name or "up_proj.lora_A" in name:
            param.requires_grad_(False)
    inputs = model_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    handles = {id(handle): handle for _, _, handle in taken}
    assert all(h._value is None and h.readers == 0 for h in handles.values())

    def same(got: torch.Tensor, expected: torch.Tensor) -> bool:
        # DoRA's second backward computes m's gradient from u again (its output was let go in the first), in a
        # different order of rounding
        return torch.allclose(got, expected, rtol=1e-5, atol=1e-8) if use_dora else torch.equal(got, expected)

    model.zero_grad()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert same(param.grad, first[name]), name
    assert all(h._value is None for h in handles.values())
    monkeypatch.undo()
    model.zero_grad()
    monkeypatch.setattr(lora_fused, "rebuildable_input", lambda x: None)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, first[name]), name


def test_a_partial_backward_leaves_no_rebuilt_input_behind_the_graph():
    """``torch.autograd.grad`` on one reader's A: the other readers never run backward, so the rebuilt input stays
    with the graph's nodes, and goes with them (nothing else holds it)."""
    import gc

    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], r=4))  # last seen: gate/up's input
    perturb(model)
    model.train()
    inputs = model_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    gate_a = next(p for n, p in model.named_parameters() if "layers.1.mlp.gate_proj.lora_A" in n)
    torch.autograd.grad(loss, [gate_a])
    handle = lora_inputs._LAST.entry[1]()
    assert handle is not None and handle._value is not None  # up_proj's backward never ran: held for it
    del handle, loss
    gc.collect()
    assert lora_inputs._LAST.entry[1]() is None


def test_a_rebuild_keeps_the_operand_order_of_a_scalar_factor():
    """``s * (a * b)`` with ``s`` a 0-dim fp32 tensor and bf16 ``a``, ``b``: PyTorch treats the 0-dim operand by its
    position, so ``s * p`` and ``p * s`` differ in the last bit for most ``s``; the rebuild must multiply in the
    forward's order (a first batch with ``s = 0.5``, exact either way, must not hide it)."""
    layer = _training_layer(16, 8).to(torch.bfloat16)
    a0, b0 = torch.randn(4, 16).bfloat16(), torch.randn(4, 16).bfloat16()

    def grad_a(scale: float, rebuild: bool) -> torch.Tensor:
        with pytest.MonkeyPatch.context() as patch:
            if not rebuild:
                patch.setattr(lora_fused, "rebuildable_input", lambda x: None)
            a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
            out = layer(torch.tensor(scale) * (a * b))
            assert (out.grad_fn.input_structure is not None) == rebuild
            return torch.autograd.grad(out.float().square().sum(), [layer.lora_A["a"].weight])[0]

    for scale in (0.5, 1.1, 0.3):
        assert torch.equal(grad_a(scale, True), grad_a(scale, False)), scale


def test_rebuildable_input_reads_only_multiplication_chains():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4)
    how, leaves = lora_inputs.rebuildable_input(a * b)
    assert torch.equal(lora_inputs.replay(how.structure, leaves), a * b)
    how, leaves = lora_inputs.rebuildable_input(w * (a * b))  # RMSNorm's shape: w kept, a * b not
    before = [t.clone() for t in leaves]
    assert torch.equal(lora_inputs.replay(how.structure, leaves), w * (a * b))
    for leaf, copy in zip(leaves, before, strict=True):  # the outer product wrote into the inner one, not a factor
        assert torch.equal(leaf, copy)
    assert lora_inputs.rebuildable_input(a + b) is None
    changed = a * b
    changed.add_(1.0)  # an in-place op after the product: its grad_fn is no longer the product's
    assert lora_inputs.rebuildable_input(changed) is None
    assert lora_inputs.rebuildable_input(torch.randn(3, 4)) is None  # no graph at all
    used = a * b
    used.sum().backward()  # frees what the product kept
    assert lora_inputs.rebuildable_input(used) is None


def test_a_chain_whose_replay_does_not_match_is_kept(monkeypatch):
    monkeypatch.setattr(lora_inputs, "_CHECKED", {})
    a = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, 6, requires_grad=True)
    real_replay = lora_inputs.replay
    monkeypatch.setattr(lora_inputs, "replay", lambda s, leaves: real_replay(s, leaves) + 1e-3)
    assert lora_inputs.rebuildable_input(a * b) is None
    monkeypatch.setattr(lora_inputs, "replay", real_replay)
    assert lora_inputs.rebuildable_input(a * b) is None  # the verdict is kept for this signature


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_factor_changed_in_place_after_forward_is_an_error_not_a_wrong_gradient(use_dora):
    layer = _training_layer(6, 5, bias=False, use_dora=use_dora)
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    out = layer(a * b)
    assert out.grad_fn.input_structure is not None
    with torch.no_grad():
        a.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("use_dora", [False, True])
def test_rebuilt_input_under_bf16_autocast_matches_the_kept_one(use_dora, monkeypatch):
    grads = {}
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(lora_fused, "rebuildable_input", lambda x: None)
        torch.manual_seed(0)
        layer = _training_layer(16, 8, use_dora=use_dora)
        a = torch.randn(3, 16, requires_grad=True)
        b = torch.randn(3, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(a * b)
        assert (out.grad_fn.input_structure is not None) == rebuild
        out.float().square().sum().backward()
        grads[rebuild] = [a.grad, b.grad, layer.lora_A["a"].weight.grad, layer.lora_B["a"].weight.grad]
        monkeypatch.undo()
    for got, expected in zip(grads[True], grads[False], strict=True):
        assert torch.equal(got, expected)


def test_under_saved_tensor_hooks_the_input_is_kept():
    """Non-reentrant activation checkpointing packs saved tensors with hooks: reading a product's factors there
    would run its unpack hook (recompute the block in the middle of forward), so the input is kept as before."""
    layer = _training_layer(6, 5)
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    assert layer(a * b).grad_fn.input_structure is not None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        x = a * b
        assert layer(x).grad_fn.input_structure is None
    out = torch.utils.checkpoint.checkpoint(lambda t, u: layer(t * u), a, b, use_reentrant=False)
    out.square().sum().backward()
    expected = [g.clone() for g in (a.grad, layer.lora_A["a"].weight.grad)]
    a.grad = None
    layer.zero_grad()
    layer(a * b).square().sum().backward()
    assert torch.equal(a.grad, expected[0]) and torch.equal(layer.lora_A["a"].weight.grad, expected[1])


def test_an_input_changed_in_place_after_the_product_is_kept(monkeypatch):
    """A hook that edits the input under no_grad (clamping, steering) leaves its grad_fn the product's: the version
    counter tells, and the input itself is kept, so A's gradient sees the edited values."""
    grads = {}
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(lora_fused, "rebuildable_input", lambda x: None)
        torch.manual_seed(0)
        layer = _training_layer(6, 5)
        a = torch.randn(4, 6, requires_grad=True)
        b = torch.randn(4, 6, requires_grad=True)
        for _ in range(2):  # the second time, the product's signature has been checked already
            x = a * b
            with torch.no_grad():
                x.clamp_(-0.2, 0.2)
            out = layer(x)
            assert out.grad_fn.input_structure is None
        out.square().sum().backward()
        grads[rebuild] = layer.lora_A["a"].weight.grad.clone()
        monkeypatch.undo()
    assert torch.equal(grads[True], grads[False])


def test_dora_keeps_u_not_its_output_under_saved_tensor_hooks():
    """Under activation checkpointing or save_on_cpu what backward needs must go through the hooks: DoRA then keeps u
    through save_for_backward instead of its output on ctx."""
    layer = _training_layer(6, 5, bias=False, use_dora=True)
    x = torch.randn(4, 6, requires_grad=True)
    assert layer(x).grad_fn.output is not None
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert out.grad_fn.output is None and torch.Size([4, 5]) in packed
    out.square().sum().backward()
    expected = [t.grad.clone() for t in (x, layer.lora_magnitude_vector["a"].weight)]
    x.grad = None
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert torch.allclose(x.grad, expected[0], atol=1e-6)
    assert torch.allclose(layer.lora_magnitude_vector["a"].weight.grad, expected[1], atol=1e-6)
