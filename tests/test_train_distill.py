"""`python -m train distill`: training captions written by an ensemble, read back by fit's reader."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.ensemble import ensemble_of
from tests.helpers import make_checkpoint, tiny_config
from tests.test_train_support import make_flickr, tiny_fit_args
from train import metrics
from train.__main__ import main
from train.data import load_dataset
from train.distill import TEACHER_FILE, DistillError, WordDistillation, load_teachers, write_distilled
from train.features import feature_source
from train.loop import CrossEntropy, Example, pad
from train.scoring import decode_captions

BEAM = BeamConfig(beam_size=2, max_len=8)


@pytest.fixture
def source(tmp_path: Path) -> str:
    return f"flickr:{make_flickr(tmp_path / 'data', n_train=4, n_val=2)}"


@pytest.fixture
def teachers(tmp_path: Path) -> list[str]:
    return [str(make_checkpoint(tmp_path / f"teacher{seed}", seed=seed, version=f"t{seed}")) for seed in (0, 1)]


@pytest.fixture
def read(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The features the teachers read during word-level distillation: each group's, batch by batch."""
    batches: list[torch.Tensor] = []
    teach = WordDistillation.teacher_probabilities

    def recording(self: WordDistillation, features: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        batches.extend(f.detach().clone() for f in features)
        return teach(self, features, tokens)

    monkeypatch.setattr(WordDistillation, "teacher_probabilities", recording)
    return batches


def _ensemble_captions(teachers: list[str], spec: str, split: str, cache: Path) -> dict[str, str]:
    models = [checkpoint.load(path) for path in teachers]
    records = load_dataset(spec, (split,)).split(split)
    features = feature_source(models[0], {r.image_id: r.path for r in records}, models[0].decoder.embedding
                              .weight.device, str(cache))
    return decode_captions(models[0], features, [r.image_id for r in records], BEAM, decoder=ensemble_of(models))


def test_training_captions_are_the_ensembles_and_validation_is_unchanged(
        tmp_path: Path, source: str, teachers: list[str]) -> None:
    out, cache = tmp_path / "distilled", tmp_path / "cache"

    counts = write_distilled(source, teachers, out, BEAM, cache=str(cache), batch_size=3)

    assert counts == {"train": 4, "val": 2}
    written, original = load_dataset(f"flickr:{out}"), load_dataset(source)
    expected = _ensemble_captions(teachers, source, "train", cache)
    assert {r.image_id: r.captions for r in written.split("train")} == {i: (c,) for i, c in expected.items()}
    assert [(r.image_id, r.captions) for r in written.split("val")] == \
           [(r.image_id, r.captions) for r in original.split("val")]
    for record in written.split("train") + written.split("val"):
        assert record.path.is_symlink()  # linked, never copied
        assert record.path.resolve() == (Path(source.removeprefix("flickr:")) / "images" / record.image_id).resolve()
    saved = json.loads((out / TEACHER_FILE).read_text())
    assert saved["teachers"] == ["t0", "t1"] and saved["decoding"]["beam_size"] == 2
    assert saved["captions"] == expected


def test_keep_references_puts_the_photos_own_captions_after_the_teachers(
        tmp_path: Path, source: str, teachers: list[str]) -> None:
    out = tmp_path / "distilled"
    write_distilled(source, teachers, out, BEAM, keep_references=True, cache=str(tmp_path / "cache"))
    teacher = json.loads((out / TEACHER_FILE).read_text())["captions"]
    original = {r.image_id: r.captions for r in load_dataset(source).split("train")}
    for record in load_dataset(f"flickr:{out}").split("train"):
        assert record.captions == (teacher[record.image_id], *original[record.image_id])


def test_an_interrupted_run_resumes_and_another_teacher_is_refused(
        tmp_path: Path, source: str, teachers: list[str]) -> None:
    out, cache = tmp_path / "distilled", str(tmp_path / "cache")
    write_distilled(source, teachers, out, BEAM, cache=cache)
    file = out / TEACHER_FILE
    saved = json.loads(file.read_text())
    first = sorted(saved["captions"])[0]
    # As if the run had stopped before the last photos: one missing, one marked so a rerun that
    # decoded it again would be seen (a resumed run keeps what is already written).
    missing = sorted(saved["captions"])[-1]
    expected_missing = saved["captions"].pop(missing)
    saved["captions"][first] = "kept from the first run"
    file.write_text(json.dumps(saved))

    write_distilled(source, teachers, out, BEAM, cache=cache)

    captions = json.loads(file.read_text())["captions"]
    assert captions[first] == "kept from the first run"
    assert captions[missing] == expected_missing
    # The same teachers under another path (a copy) are the same teachers: nothing is decoded again.
    import shutil
    copy = tmp_path / "copy_of_teacher0"
    shutil.copytree(teachers[0], copy)
    write_distilled(source, [str(copy), teachers[1]], out, BEAM, cache=cache)
    assert json.loads(file.read_text())["captions"][first] == "kept from the first run"
    with pytest.raises(DistillError, match="other teachers"):
        write_distilled(source, teachers[:1], out, BEAM, cache=cache)
    with pytest.raises(DistillError, match="other teachers"):
        write_distilled(source, teachers, out, BeamConfig(beam_size=3, max_len=8), cache=cache)


def test_the_command_writes_a_dataset_fit_reads(tmp_path: Path, source: str, teachers: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "distilled"
    args = ["distill", "--data", source, "--teacher", teachers[0], "--teacher", teachers[1], "--out", str(out),
            "--beam", "2", "--cache", str(tmp_path / "cache")]
    assert main(args) == 0
    assert "train 4 images, val 2 images" in capsys.readouterr().out
    assert len(load_dataset(f"flickr:{out}").split("train")) == 4
    with pytest.raises(ValueError, match="must be one of the splits"):
        write_distilled(source, teachers, tmp_path / "other", BEAM, splits=("val",), cache=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- word level


def _batch(model: checkpoint.CaptionModel) -> tuple[torch.Tensor, list[Example]]:
    torch.manual_seed(3)
    texts = ["a dog runs on the grass", "two man in red shirt", "a cat is in the water"]
    examples = [Example(f"i{n}", model.vocab.encode(text)) for n, text in enumerate(texts)]
    return torch.randn(len(texts), 4, model.decoder.encoder_dim), examples


def test_weight_zero_is_plain_cross_entropy_and_the_teachers_mean_is_the_target(tmp_path: Path) -> None:
    student = checkpoint.load(make_checkpoint(tmp_path / "s", seed=0))
    teachers = [checkpoint.load(make_checkpoint(tmp_path / f"t{seed}", seed=seed)).decoder for seed in (1, 2)]
    features, batch = _batch(student)
    pad_id = student.vocab.pad_id
    plain = CrossEntropy(pad_id, alpha_c=1.0, label_smoothing=0.0)(student.decoder, features, batch)
    none = WordDistillation([(teachers, None)], 0.0, pad_id, alpha_c=1.0)(student.decoder, features, batch)
    assert torch.allclose(none[0], plain[0], atol=1e-6) and torch.allclose(none[1], plain[1], atol=1e-6)

    # weight 1: the target is the mean of the teachers' distributions, word by word.
    loss, reported = WordDistillation([(teachers, None)], 1.0, pad_id, alpha_c=0.0)(student.decoder, features, batch)
    tokens = pad([e.tokens for e in batch], pad_id)
    mask = tokens[:, 1:] != pad_id
    with torch.no_grad():
        target = sum(torch.softmax(t(features, tokens)[0], dim=-1) for t in teachers) / 2
    expected = -(target * torch.log_softmax(student.decoder(features, tokens)[0], dim=-1)).sum(-1)[mask].mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(reported, plain[1], atol=1e-6)  # the references' cross-entropy, as fit reports


def test_training_on_the_teachers_words_brings_the_student_to_them(tmp_path: Path) -> None:
    student = checkpoint.load(make_checkpoint(tmp_path / "s", seed=0))
    teacher = checkpoint.load(make_checkpoint(tmp_path / "t", seed=1))
    features, batch = _batch(student)
    [group] = load_teachers([str(tmp_path / "t")], student, torch.device("cpu"))
    objective = WordDistillation([(group.decoders, None)], 1.0, student.vocab.pad_id, alpha_c=0.0)
    optimizer = torch.optim.Adam(student.decoder.parameters(), lr=1e-2)
    tokens = pad([e.tokens for e in batch], student.vocab.pad_id)

    def distance() -> float:
        with torch.no_grad():
            mine = torch.log_softmax(student.decoder(features, tokens)[0], dim=-1)
            theirs = torch.softmax(teacher.decoder(features, tokens)[0], dim=-1)
            return float((theirs * (theirs.clamp_min(1e-12).log() - mine)).sum(-1).mean())

    before = distance()
    for _ in range(30):
        loss, _ = objective(student.decoder, features, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert distance() < 0.2 * before
    assert all(not p.requires_grad for t in objective.teachers for p in t.parameters())


def test_fit_distills_and_records_its_teachers(tmp_path: Path, source: str, teachers: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    out = tmp_path / "student"
    args = tiny_fit_args(source, out, tmp_path / "cache", epochs=1, init_from=teachers[0],
                         distill_from=",".join(teachers), distill_weight=0.7, progress=False)
    assert main(args) == 0
    meta = checkpoint.read_document(out / "best")["meta"]
    assert meta["distillation"] == {"kind": "word", "teachers": ["t0", "t1"], "weight": 0.7}
    with pytest.raises(ValueError, match="different stages"):
        main([*args, "--scst", "--out", str(tmp_path / "both")])
    with pytest.raises(ValueError, match="label-smoothing"):
        main([*args, "--label-smoothing", "0.1", "--out", str(tmp_path / "smoothed")])


def test_a_fine_tuned_student_is_taught_on_the_public_encoders_features(
        tmp_path: Path, source: str, teachers: list[str], read: list[torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The teachers were trained on the public encoder's features: they read those, not the student's,
    whose top encoder block moves as it is fine-tuned."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    out = tmp_path / "student"
    assert main(tiny_fit_args(source, out, tmp_path / "cache", epochs=1, init_from=teachers[0],
                              distill_from=",".join(teachers), fine_tune_blocks=1, encoder_lr=0.3,
                              progress=False)) == 0
    public, student = checkpoint.load(teachers[0]), checkpoint.load(out / "last")
    records = load_dataset(source, ("train",)).split("train")
    images = {r.image_id: r.path for r in records}
    ids = sorted(images)
    public_rows = feature_source(public, images, torch.device("cpu"), None)(ids)
    student_rows = feature_source(student, images, torch.device("cpu"), None)(ids)
    assert not torch.allclose(public_rows, student_rows, atol=0.05)  # the student's encoder did move
    assert len(read) >= 5
    for batch in read:
        for features in batch:  # each photo's features, as the teachers read them, are the public ones
            assert torch.isclose(public_rows, features, atol=2e-2).all(dim=(1, 2)).any()


def test_a_student_on_a_finer_grid_is_taught_on_its_teachers_features(
        tmp_path: Path, source: str, teachers: list[str], read: list[torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A student that attends over another grid (here the tiny encoder at twice the size: 4x4 regions
    against its teachers' 2x2) learns from teachers that read the features they were trained on."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    start = make_checkpoint(tmp_path / "fine", tiny_config(image_size=128), seed=2)
    out = tmp_path / "student"
    assert main(tiny_fit_args(source, out, tmp_path / "cache", epochs=1, init_from=start, image_size=128,
                              distill_from=",".join(teachers), progress=False)) == 0
    teacher, student = checkpoint.load(teachers[0]), checkpoint.load(out / "last")
    images = {r.image_id: r.path for r in load_dataset(source, ("train",)).split("train")}
    ids = sorted(images)
    theirs = feature_source(teacher, images, torch.device("cpu"), None)(ids)
    assert theirs.shape[1] == 4 and feature_source(student, images, torch.device("cpu"), None)(ids).shape[1] == 16
    assert len(read) >= 2
    for batch in read:
        for features in batch:
            assert torch.isclose(theirs, features, atol=2e-2).all(dim=(1, 2)).any()


def test_teachers_are_grouped_by_the_features_they_read(tmp_path: Path, teachers: list[str]) -> None:
    student = checkpoint.load(teachers[0])
    tuned = make_checkpoint(tmp_path / "tuned", tiny_config(fine_tune_blocks=1))
    other = str(make_checkpoint(tmp_path / "other", tiny_config(image_size=128), version="other"))
    groups = load_teachers([teachers[0], other, teachers[1]], student, torch.device("cpu"))
    assert [len(g.decoders) for g in groups] == [2, 1]
    assert groups[0].features_model is None  # the student's own features
    assert groups[1].features_model is not None and groups[1].features_model.version == "other"
    with pytest.raises(ValueError, match="fine-tuned encoder"):
        load_teachers([teachers[0], str(tuned)], student, torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one"):
        load_teachers([], student, torch.device("cpu"))


def test_each_teacher_reads_its_own_features_and_the_target_is_their_mean(tmp_path: Path) -> None:
    student = checkpoint.load(make_checkpoint(tmp_path / "s", seed=0))
    near, far = (checkpoint.load(make_checkpoint(tmp_path / f"t{seed}", seed=seed)).decoder for seed in (1, 2))
    features, batch = _batch(student)
    torch.manual_seed(5)
    own = torch.randn(len(batch), 16, far.encoder_dim)  # another grid: 16 regions against the student's 4
    calls: list[list[str]] = []

    def far_features(ids: Sequence[str]) -> torch.Tensor:
        calls.append(list(ids))
        return own

    pad_id = student.vocab.pad_id
    loss, _ = WordDistillation([([near], None), ([far, far], far_features)], 1.0, pad_id,
                               alpha_c=0.0)(student.decoder, features, batch)
    assert calls == [[e.image_id for e in batch]]  # one read a batch for the teachers that share a source
    tokens = pad([e.tokens for e in batch], pad_id)
    mask = tokens[:, 1:] != pad_id
    with torch.no_grad():
        target = (torch.softmax(near(features, tokens)[0], dim=-1) + 2 * torch.softmax(far(own, tokens)[0], dim=-1)) / 3
    expected = -(target * torch.log_softmax(student.decoder(features, tokens)[0], dim=-1)).sum(-1)[mask].mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_teachers_on_two_grids_teach_one_student(
        tmp_path: Path, source: str, teachers: list[str], read: list[torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2x2 teacher (the student's grid) and a 4x4 one distil into the student together, each reading its own."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    finer = str(make_checkpoint(tmp_path / "finer", tiny_config(image_size=128), seed=2, version="finer"))
    out = tmp_path / "student"
    assert main(tiny_fit_args(source, out, tmp_path / "cache", epochs=1, init_from=teachers[0],
                              distill_from=",".join([teachers[1], finer]), progress=False)) == 0
    assert checkpoint.read_document(out / "best")["meta"]["distillation"]["teachers"] == ["t1", "finer"]
    assert {f.shape[1] for f in read} == {4, 16}  # regions: the 2x2 teacher's and the 4x4 one's
