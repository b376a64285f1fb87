import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from captioner.encoder import Encoder, EncoderWeightsError
from captioner.inference import Captioner, photo_like_images, preprocess, to_model_input
from tests.helpers import make_checkpoint, tiny_config

EGYPTIAN_CAT = 285


@torch.no_grad()
def test_default_encoder_recognises_the_chelsea_cat() -> None:
    """The shipped ImageNet weights load and our preprocessing (RGB, normalisation, size) fits them."""
    data = pytest.importorskip("skimage.data")
    encoder = Encoder("efficientnet_lite0").eval()
    image = Image.fromarray(data.chelsea())
    x = to_model_input(image, 224, encoder.mean, encoder.std).unsqueeze(0)
    probs = encoder.backbone.classify(x).softmax(-1)[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT
    assert float(probs[EGYPTIAN_CAT]) > 0.5
    # Swapping to BGR, the classic preprocessing bug, makes the model less sure.
    assert float(encoder.backbone.classify(x.flip(1)).softmax(-1)[0, EGYPTIAN_CAT]) < float(probs[EGYPTIAN_CAT])


@torch.no_grad()
def test_default_encoder_gives_a_grid_of_regions() -> None:
    encoder = Encoder("efficientnet_lite0").eval()
    assert encoder(torch.zeros(2, 3, 224, 224)).shape == (2, 49, 1280)


def test_torchvision_backbone_loads_weights_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    for file in ("r18.safetensors", "r18.pth"):
        encoder = Encoder("resnet18", weights=str(tmp_path / file)).eval()
        assert torch.equal(encoder.backbone.stages[3][1].conv2.weight, reference.layer4[1].conv2.weight)
        with torch.no_grad():
            assert encoder(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 512)
    with pytest.raises(EncoderWeightsError, match="not found"):
        Encoder("resnet18", weights=str(tmp_path / "missing.pth"))


def test_torchvision_backbone_without_a_file_asks_torchvision_for_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[object] = []
    real = torchvision.models.resnet18

    def fake_resnet18(weights: object = None) -> torch.nn.Module:
        asked.append(weights)
        return real(weights=None)

    monkeypatch.setattr(torchvision.models, "resnet18", fake_resnet18)
    Encoder("resnet18")
    assert asked == ["DEFAULT"]


def test_fine_tune_blocks_unfreezes_only_the_top_stages() -> None:
    encoder = Encoder("efficientnet_lite0", fine_tune_blocks=2)
    stages = list(encoder.backbone.stages)
    trainable = [any(p.requires_grad for p in s.parameters()) for s in stages]
    assert trainable[-2:] == [True, True] and not any(trainable[:-2])
    assert not any(p.requires_grad for p in encoder.backbone.stem.parameters())
    frozen = Encoder("efficientnet_lite0")
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.backbone.training  # frozen batch-norm statistics stay ImageNet's


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'vgg7'"):
        Encoder("vgg7")


def test_tiny_backbone_is_deterministic() -> None:
    a, b = Encoder("tiny"), Encoder("tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert np.isfinite(a(torch.zeros(1, 3, 64, 64)).detach().numpy()).all()


class _Drifted(nn.Module):
    """A 'frozen' encoder that has drifted from the eager one (as a bad graph rewrite would)."""

    def __init__(self, frozen: nn.Module) -> None:
        super().__init__()
        self.frozen = frozen

    def forward(self, images: Tensor) -> Tensor:
        return self.frozen(images) + 0.05


def _serves_eager(captioner: Captioner) -> bool:
    inputs = torch.stack([preprocess(captioner.model, p) for p in photo_like_images(2, seed=9)])
    with torch.inference_mode():
        return torch.equal(captioner.encode(inputs), captioner.model.encoder(inputs))


class _Counting(nn.Module):
    """The frozen encoder, counting the images it is asked to encode."""

    def __init__(self, frozen: nn.Module) -> None:
        super().__init__()
        self.frozen = frozen
        self.images = 0

    def forward(self, images: Tensor) -> Tensor:
        self.images += images.size(0)
        return self.frozen(images)


def test_frozen_encoder_is_served_when_it_matches(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[_Counting] = []
    optimize = torch.jit.optimize_for_inference

    def optimize_and_count(module: torch.jit.ScriptModule) -> _Counting:
        made.append(_Counting(optimize(module)))
        return made[-1]

    monkeypatch.setattr(torch.jit, "optimize_for_inference", optimize_and_count)
    captioner = Captioner.load(tiny_checkpoint, "cpu")
    assert captioner.freeze_encoder()
    checked = made[0].images  # the photo-like images it was compared on
    inputs = torch.stack([preprocess(captioner.model, p) for p in photo_like_images(3, seed=9)])
    with torch.inference_mode():
        served, eager = captioner.encode(inputs), captioner.model.encoder(inputs)
    assert made[0].images == checked + 3  # encode() really went through the frozen encoder
    assert torch.allclose(served, eager, atol=1e-4, rtol=1e-4)


def test_drifted_frozen_encoder_is_refused_with_a_warning(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.jit, "optimize_for_inference", _Drifted)
    captioner = Captioner.load(tiny_checkpoint, "cpu")
    with caplog.at_level(logging.WARNING, logger="captioner.inference"):
        assert not captioner.freeze_encoder()
    assert any("encoder not frozen" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)
    assert _serves_eager(captioner)


def test_tracing_failure_falls_back_with_a_warning(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", fail)
    captioner = Captioner.load(tiny_checkpoint, "cpu")
    with caplog.at_level(logging.WARNING, logger="captioner.inference"):
        assert not captioner.freeze_encoder()
    assert any("cannot trace this" in r.getMessage() for r in caplog.records)
    assert _serves_eager(captioner)


def test_an_encoder_fine_tuned_in_training_is_served_frozen(tmp_path: Path) -> None:
    tuned = make_checkpoint(tmp_path / "tuned", tiny_config(fine_tune_blocks=1))
    captioner = Captioner.load(tuned, "cpu")
    assert captioner.model.encoder.trainable_blocks == 1 and captioner.freeze_encoder()
    inputs = torch.stack([preprocess(captioner.model, p) for p in photo_like_images(2, seed=3)])
    with torch.inference_mode():
        assert torch.allclose(captioner.encode(inputs), captioner.model.encoder(inputs), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_output_stride_16_gives_a_finer_grid_from_the_same_weights() -> None:
    """The dilated Lite1 keeps its ImageNet weights: a 14x14 grid that still sees the cat."""
    data = pytest.importorskip("skimage.data")
    coarse, fine = Encoder("efficientnet_lite1").eval(), Encoder("efficientnet_lite1_os16").eval()
    assert all(torch.equal(a, b) for a, b in zip(coarse.state_dict().values(), fine.state_dict().values(),
                                                  strict=True))
    x = to_model_input(Image.fromarray(data.chelsea()), 224, fine.mean, fine.std).unsqueeze(0)
    assert coarse(x).shape == (1, 49, 1280)
    assert fine(x).shape == (1, 196, 1280)
    probs = fine.backbone.classify(x).softmax(-1)[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT
