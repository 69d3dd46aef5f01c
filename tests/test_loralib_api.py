"""loralib-style layers for hand-built models."""

from __future__ import annotations

import torch
from torch import nn

from deltatune import loralib as lora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = lora.Embedding(50, 8, r=2, lora_alpha=4)
        self.conv = lora.Conv2d(1, 4, 3, r=2, padding=1)
        self.fc = lora.Linear(8, 3, r=4, lora_alpha=8)
        self.head = nn.Linear(3, 2)

    def forward(self, ids, image):
        return self.head(self.fc(self.emb(ids).mean(1) + self.conv(image).mean((1, 2, 3))[:, None]))


def test_mark_only_lora_as_trainable_and_state_dict():
    net = Net()
    lora.mark_only_lora_as_trainable(net)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(lora.lora_state_dict(net)) == trainable
    lora.mark_only_lora_as_trainable(net, bias="lora_only")
    assert {n for n, p in net.named_parameters() if p.requires_grad} - trainable == {
        "fc.base_layer.bias", "conv.base_layer.bias"}
    lora.mark_only_lora_as_trainable(net, bias="all")
    assert "head.bias" in {n for n, p in net.named_parameters() if p.requires_grad}
    assert "head.bias" in lora.lora_state_dict(net, bias="all")


def test_layers_start_as_identity_to_their_base_and_learn():
    net = Net()
    ids, image = torch.randint(0, 50, (4, 5)), torch.randn(4, 1, 6, 6)
    fc = net.fc
    x = torch.randn(4, 8)
    assert torch.equal(fc(x), fc.base_layer(x))  # B = 0 at init
    lora.mark_only_lora_as_trainable(net)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    before = net(ids, image).detach()
    for _ in range(3):
        net(ids, image).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(net(ids, image), before)
    # merging is explicit and keeps the output
    out = net(ids, image).detach()
    for layer in (net.emb, net.conv, net.fc):
        layer.merge()
    assert torch.allclose(net(ids, image), out, atol=1e-5)


def test_state_dict_round_trip():
    a, b = Net(), Net()
    lora.mark_only_lora_as_trainable(a)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in lora.lora_state_dict(a).items())
