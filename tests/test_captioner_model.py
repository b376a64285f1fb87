import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.beam import BeamConfig, SpecialIds, beam_search
from captioner.checkpoint import CaptionModel, CheckpointError
from captioner.model import Decoder, ModelConfig, attention_regularization
from captioner.vocab import Vocabulary
from tests.helpers import make_checkpoint, tiny_config

SPECIAL = SpecialIds()


def _decoder(vocab_size: int = 7, seed: int = 0, **cfg: object) -> Decoder:
    torch.manual_seed(seed)
    config = ModelConfig(encoder="tiny", embed_dim=8, attention_dim=8, hidden_dim=12, dropout=0.0, **cfg)  # type: ignore[arg-type]
    decoder = Decoder(config, encoder_dim=6, vocab_size=vocab_size).eval()
    with torch.no_grad():  # sharper distributions make ties impossible and the search non-trivial
        decoder.classifier.weight.mul_(30)
    return decoder


def test_teacher_forcing_shapes_and_attention_sums_to_one() -> None:
    decoder = _decoder()
    features = torch.randn(3, 5, 6)
    tokens = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0], [1, 4, 4, 5, 2]])
    logits, alphas = decoder(features, tokens)
    assert logits.shape == (3, 4, 7) and alphas.shape == (3, 4, 5)
    assert torch.allclose(alphas.sum(-1), torch.ones(3, 4))
    mask = (tokens[:, 1:] != 0).float()
    assert attention_regularization(alphas, mask).item() >= 0


def _exhaustive_best(decoder: Decoder, features: torch.Tensor, max_len: int, penalty: float) -> tuple[list[int], float]:
    """Score every caption of up to max_len words the way beam search defines it."""
    words = [w for w in range(decoder.vocab_size) if w not in (SPECIAL.pad, SPECIAL.start, SPECIAL.end, SPECIAL.unk)]
    best: tuple[list[int], float] = ([], -math.inf)
    projected = decoder.attention.project(features)
    for length in range(1, max_len + 1):
        for seq in itertools.product(words, repeat=length):
            state = decoder.init_state(features)
            token = torch.tensor([SPECIAL.start])
            total = 0.0
            for w in seq:
                out = decoder.step(token, features, projected, state)
                total += float(out.log_probs[0, w])
                state, token = out.state, torch.tensor([w])
            if length < max_len:  # finished: <end> follows and counts in the length
                out = decoder.step(token, features, projected, state)
                total += float(out.log_probs[0, SPECIAL.end])
                score = total / (length + 1) ** penalty
            else:  # cut by max_len without <end>
                score = total / length**penalty
            if score > best[1]:
                best = (list(seq), score)
    return best


@pytest.mark.parametrize("penalty", [0.0, 1.0])
@torch.no_grad()
def test_beam_search_with_large_beam_equals_exhaustive_search(penalty: float) -> None:
    for seed in range(3):
        decoder = _decoder(seed=seed)
        features = torch.randn(1, 4, 6)
        expected_tokens, expected_score = _exhaustive_best(decoder, features, 3, penalty)
        hyp = beam_search(decoder, features, BeamConfig(beam_size=64, max_len=3, length_penalty=penalty))[0]
        assert hyp.tokens == expected_tokens
        assert hyp.score == pytest.approx(expected_score, abs=1e-4)


@torch.no_grad()
def test_batched_decoding_equals_one_image_at_a_time() -> None:
    decoder = _decoder(vocab_size=30, seed=1)
    features = torch.randn(16, 9, 6)
    config = BeamConfig(beam_size=3, max_len=12, length_penalty=0.5)
    batched = beam_search(decoder, features, config)
    for i in range(16):
        single = beam_search(decoder, features[i:i + 1], config)[0]
        assert batched[i].tokens == single.tokens
        assert batched[i].score == pytest.approx(single.score, abs=1e-5)
        assert torch.allclose(batched[i].attention, single.attention, atol=1e-5)


@torch.no_grad()
def test_every_image_gets_a_caption_even_if_no_beam_ends() -> None:
    decoder = _decoder(vocab_size=10)
    decoder.classifier.bias[SPECIAL.end] = -1e4
    hyps = beam_search(decoder, torch.randn(4, 3, 6), BeamConfig(beam_size=3, max_len=6))
    for hyp in hyps:
        assert len(hyp.tokens) == 6 and not hyp.finished
        assert hyp.attention.shape == (6, 3)
        assert all(t > SPECIAL.unk for t in hyp.tokens)


@torch.no_grad()
def test_ngram_blocking_prevents_repeats() -> None:
    decoder = _decoder(vocab_size=10)
    decoder.classifier.bias[5] = 50.0
    decoder.classifier.bias[SPECIAL.end] = -50.0
    plain = beam_search(decoder, torch.randn(1, 3, 6), BeamConfig(beam_size=2, max_len=6))[0]
    assert plain.tokens == [5] * 6
    blocked = beam_search(decoder, torch.randn(1, 3, 6), BeamConfig(beam_size=2, max_len=6, block_ngram=2))[0]
    bigrams = list(zip(blocked.tokens, blocked.tokens[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))


@torch.no_grad()
def test_grow_vocabulary_keeps_old_words_predictions() -> None:
    decoder = _decoder(vocab_size=9)
    features, tokens = torch.randn(2, 4, 6), torch.tensor([[1, 4, 5, 6], [1, 7, 8, 2]])
    before, _ = decoder(features, tokens)
    decoder.grow_vocabulary(12, init_from=[[4, 5], [], [8]])
    after, _ = decoder(features, tokens)
    assert after.shape[-1] == 12
    # A wider output matmul may round differently in the last bit; the logits are otherwise the same.
    assert torch.allclose(before, after[..., :9], atol=1e-6)
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    assert torch.allclose(decoder.embedding.weight[9], decoder.embedding.weight[[4, 5]].mean(0))


def _weights(model: CaptionModel) -> dict[str, torch.Tensor]:
    parts = {"decoder": model.decoder, "encoder": model.encoder.backbone}
    return {f"{prefix}.{name}": tensor for prefix, module in parts.items()
            for name, tensor in module.state_dict().items()}


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = CaptionModel.create(tiny_config(), Vocabulary.build(["a dog runs"], min_freq=1), {"version": "test-v1"})
    with torch.no_grad():  # the tiny encoder starts from fixed weights: move them so loading must show
        for parameter in model.encoder.backbone.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = checkpoint.save(model, tmp_path / "ck")
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]
    assert all((path / name).stat().st_mode & 0o777 == 0o644 for name in ("model.json", "model.safetensors"))
    torch.manual_seed(4)  # a model that only initialised itself would now differ from the saved one
    a, b = checkpoint.load(path), checkpoint.load(path)
    saved, loaded = _weights(model), _weights(a)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)
    torch.manual_seed(4)
    fresh = _weights(CaptionModel.create(tiny_config(), model.vocab, pretrained_encoder=False))
    assert not all(torch.equal(saved[name], fresh[name]) for name in saved)
    assert not torch.equal(saved["encoder.stem.conv.weight"], fresh["encoder.stem.conv.weight"])
    images = torch.randn(2, 3, 64, 64)
    fa, fb = a.encoder(images), b.encoder(images)
    assert torch.equal(fa, fb) and torch.equal(fa, model.encoder.eval()(images))
    assert a.vocab.words == b.vocab.words and a.version == "test-v1"


def test_checkpoint_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_checkpoint(tmp_path / "ck")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    checkpoint.load(path)


def test_float16_checkpoint_loads_in_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CaptionModel.create(tiny_config(), Vocabulary.build(["a dog"], min_freq=1))
    checkpoint.save(model, tmp_path / "half", dtype=torch.float16)
    loaded = checkpoint.load(tmp_path / "half")
    assert loaded.decoder.embedding.weight.dtype == torch.float32
    assert torch.allclose(loaded.decoder.embedding.weight, model.decoder.embedding.weight, atol=1e-3)


def test_checkpoint_that_does_not_match_its_config_names_the_difference(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ck")
    document = json.loads((path / "model.json").read_text())
    document["vocab"]["words"].append("zebra")
    (path / "model.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"decoder\.embedding\.weight has shape"):
        checkpoint.load(path)
    document["config"]["hidden_dim"] = 64
    (path / "model.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="does not match its config"):
        checkpoint.load(path)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.json").write_text("{}")
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a captionbot-checkpoint"):
        checkpoint.load(tmp_path / "x")
    document = {"format": "captionbot-checkpoint", "format_version": 1, "config": {"bogus": 1}, "vocab": {}}
    (tmp_path / "x" / "model.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="bogus"):
        checkpoint.load(tmp_path / "x")
