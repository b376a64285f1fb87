from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from captioner.encoder import Encoder, EncoderWeightsError
from captioner.inference import to_model_input

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
