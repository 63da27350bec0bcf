"""Small models for the adapter tests: an MLP, a CNN with BatchNorm and a residual block,
and a pre-norm transformer block (multi-head attention, FFN, LayerNorm)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune


class MLP(nn.Module):
    def __init__(self, d_in=40, hidden=(96, 80), d_out=10):
        super().__init__()
        dims = (d_in, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norm = nn.BatchNorm1d(hidden[0])
        self.head = nn.Linear(hidden[-1], d_out)

    def forward(self, x):
        x = torch.relu(self.norm(self.layers[0](x)))
        for layer in self.layers[1:]:
            x = torch.relu(layer(x))
        return self.head(x)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class CNN(nn.Module):
    def __init__(self, c=32, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.block = ResBlock(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, 48)
        self.head = nn.Linear(48, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = torch.relu(self.down(x))
        x = torch.flatten(self.pool(x), 1)
        return self.head(torch.relu(self.fc(x)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        h = self.heads

        def split(t):
            return t.view(B, T, h, D // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // h), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    def __init__(self, d=64, heads=4, ffn=128):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.act = nn.GELU()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def zoo():
    """name -> (model factory, example input)."""
    return {
        "mlp": (MLP, lambda: torch.randn(6, 40)),
        "cnn": (CNN, lambda: torch.randn(2, 3, 12, 12)),
        "transformer": (TransformerBlock, lambda: torch.randn(2, 5, 64)),
    }


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm / LayerNorm parameters and running stats (fresh ones are
    0 and 1 everywhere, which would hide a missing permutation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def prune_layers(model: nn.Module, amount: float = 0.85) -> None:
    """Magnitude pruning of every Linear / Conv2d weight, layer by layer
    (torch.nn.utils.prune.l1_unstructured)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(m, "weight", amount=amount)


def pruned(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model (eval mode) with random norms, pruned to 85 %, and its example input."""
    make, inp = zoo()[name]
    torch.manual_seed(seed)
    model = make()
    randomize_norms(model, seed)
    prune_layers(model)
    return model.eval(), inp()


def prune_encoder(model: nn.Module, amount: float = 0.8) -> nn.Module:
    """Magnitude pruning of an nn.TransformerEncoder: every Linear weight and every
    MultiheadAttention in_proj_weight (torch.nn.utils.prune.l1_unstructured)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount)
        elif isinstance(m, nn.MultiheadAttention):
            prune.l1_unstructured(m, "in_proj_weight", amount)
    return model
