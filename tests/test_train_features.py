"""The float16 feature cache: resumable, reused across runs, invalidated when the encoder changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import CaptionModel
from captioner.vocab import Vocabulary
from tests.helpers import tiny_config
from tests.test_train_support import make_flickr
from train import features
from train.data import load_dataset
from train.features import FeatureCache, FeatureSource, encoder_fingerprint, fill_cache, open_cache


def tiny_model(**overrides: object) -> CaptionModel:
    return CaptionModel.create(tiny_config(**overrides), Vocabulary.build(["a dog"], min_freq=1))


def image_paths(tmp_path: Path, n_train: int = 6) -> list[Path]:
    root = make_flickr(tmp_path / "data", n_train=n_train, n_val=1)
    return [r.path for r in load_dataset(f"flickr:{root}", ("train",)).split("train")]


class CountingReads:
    """Counts the images fill_cache decodes; can fail after ``fail_after`` of them (an interruption)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.count, self.fail_after = 0, fail_after

    def __call__(self, path: Path) -> Image.Image:
        if self.fail_after is not None and self.count >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.count += 1
        return features.load_image(path.read_bytes())


def direct_features(model: CaptionModel, paths: list[Path]) -> np.ndarray:
    with torch.no_grad():
        pixels = torch.stack([features.preprocess(model, features._read(p)) for p in paths])
        return model.encoder.eval()(pixels).to(torch.float16).numpy()


def test_fill_is_resumable_after_an_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = tiny_model(), image_paths(tmp_path)
    reads = CountingReads(fail_after=4)
    monkeypatch.setattr(features, "_read", reads)
    cache = open_cache(model, tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        fill_cache(cache, model, paths, torch.device("cpu"), batch_size=2, progress=False)
    # A new process sees the two finished chunks on disk and computes only the rest.
    reopened = open_cache(model, tmp_path / "cache")
    assert reopened.directory == cache.directory
    assert reopened.missing(paths) == paths[4:]
    reads = CountingReads()
    monkeypatch.setattr(features, "_read", reads)
    fill_cache(reopened, model, paths, torch.device("cpu"), batch_size=2, progress=False)
    assert reads.count == 2
    final = open_cache(model, tmp_path / "cache")
    assert final.missing(paths) == []
    np.testing.assert_allclose(final.get(paths).astype(np.float32),
                               direct_features(model, paths).astype(np.float32), rtol=0, atol=1e-3)
    assert final.get(paths).dtype == np.float16


def test_second_run_computes_nothing_and_new_images_get_a_new_shard(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = tiny_model(), image_paths(tmp_path)
    fill_cache(open_cache(model, tmp_path / "cache"), model, paths[:4], torch.device("cpu"), progress=False)
    reads = CountingReads()
    monkeypatch.setattr(features, "_read", reads)
    cache = open_cache(tiny_model(), tmp_path / "cache")  # a new run builds the same encoder again
    fill_cache(cache, model, paths[:4], torch.device("cpu"), progress=False)
    assert reads.count == 0
    before = cache.get(paths[:4]).copy()
    fill_cache(cache, model, paths, torch.device("cpu"), progress=False)  # two more images
    assert reads.count == 2
    assert sorted(p.name for p in cache.directory.glob("shard-*.npy")) == ["shard-0.npy", "shard-1.npy"]
    again = open_cache(model, tmp_path / "cache")
    np.testing.assert_array_equal(again.get(paths[:4]), before)
    assert again.missing(paths) == []


def test_encoder_change_means_a_new_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = tiny_model(), image_paths(tmp_path, n_train=2)
    cache = open_cache(model, tmp_path / "cache")
    fill_cache(cache, model, paths, torch.device("cpu"), progress=False)
    assert cache.directory.name == f"tiny-{encoder_fingerprint(model)}"
    assert encoder_fingerprint(tiny_model()) == encoder_fingerprint(model)

    tuned = tiny_model()
    with torch.no_grad():
        # e.g. after fine-tuning the top block
        dict(tuned.encoder.backbone.named_parameters())["stages.3.conv.bias"].add_(0.01)
    other_size = tiny_model(image_size=96)
    monkeypatch.setattr(features, "PREPROCESS_VERSION", features.PREPROCESS_VERSION + 1)
    new_preprocessing = encoder_fingerprint(model)
    monkeypatch.undo()
    folders = {open_cache(m, tmp_path / "cache").directory for m in (tuned, other_size)}
    assert len(folders | {cache.directory}) == 3
    assert new_preprocessing != encoder_fingerprint(model)
    fresh = open_cache(tuned, tmp_path / "cache")
    fresh.add(paths)
    assert fresh.missing(paths) == paths  # nothing is reused from the old encoder's features
    assert open_cache(model, tmp_path / "cache").missing(paths) == []  # the old cache is intact


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    model, paths = tiny_model(), image_paths(tmp_path, n_train=2)
    fill_cache(open_cache(model, tmp_path / "cache"), model, paths, torch.device("cpu"), progress=False)
    wrong = FeatureCache(open_cache(model, tmp_path / "cache").directory, regions=9, dim=64)
    with pytest.raises(RuntimeError, match="delete it to rebuild"):
        wrong.get(paths)


def test_missing_images_fail_before_extraction(tmp_path: Path) -> None:
    model, paths = tiny_model(), image_paths(tmp_path, n_train=2)
    paths[1].unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images not found"):
        fill_cache(open_cache(model, tmp_path / "cache"), model, paths, torch.device("cpu"), progress=False)


def test_feature_source_reads_the_same_from_memory_and_from_the_memmap(tmp_path: Path) -> None:
    model, paths = tiny_model(), image_paths(tmp_path, n_train=4)
    cache = open_cache(model, tmp_path / "cache")
    fill_cache(cache, model, paths, torch.device("cpu"), progress=False)
    records = {p.name: p for p in paths}
    ids = [paths[2].name, paths[0].name, paths[2].name]  # captions of one image share its row
    in_ram = FeatureSource(model, records, cache, torch.device("cpu"), in_memory=True)
    per_batch = FeatureSource(model, records, cache, torch.device("cpu"), in_memory=False)
    raw = FeatureSource(model, records, None, torch.device("cpu"))
    assert in_ram.table is not None and per_batch.table is None
    a, b, c = in_ram(ids), per_batch(ids), raw(ids)
    assert a.dtype == b.dtype == c.dtype == torch.float32 and a.shape == (3, 4, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-3)
    torch.testing.assert_close(a[0], a[2])


@pytest.mark.parametrize("in_memory", [True, False])
def test_private_images_are_held_in_memory_and_never_cached(tmp_path: Path, in_memory: bool) -> None:
    """People's photos (``add_in_memory``) mixed in batches with cached public images: the same
    features as from pixels, in the batch's order, and no cache entry names them."""
    model, paths = tiny_model(), image_paths(tmp_path, n_train=4)
    public, private = {p.name: p for p in paths[:2]}, {p.name: p for p in paths[2:]}
    source = features.feature_source(model, public, torch.device("cpu"), str(tmp_path / "cache"))
    if not in_memory:
        source = FeatureSource(model, public, source.cache, torch.device("cpu"), in_memory=False)
    source.add_in_memory(private)
    ids = [paths[3].name, paths[0].name, paths[2].name, paths[3].name, paths[1].name]
    mixed = source(ids)
    raw = FeatureSource(model, public | private, None, torch.device("cpu"))(ids)
    assert mixed.shape == raw.shape == (5, 4, 64)
    torch.testing.assert_close(mixed, raw, rtol=0, atol=1e-3)
    torch.testing.assert_close(source(ids[:1] + ids[2:3]), raw[[0, 2]], rtol=0, atol=1e-3)  # private only
    index = open_cache(model, tmp_path / "cache").index
    assert set(index) == {FeatureCache.key(p) for p in paths[:2]}


def test_features_cached_of_people_photos_are_erased(tmp_path: Path) -> None:
    """What earlier versions cached of the bot's photo folder is zeroed and unindexed; the rest stays."""
    model, public = tiny_model(), image_paths(tmp_path, n_train=3)
    people = tmp_path / "botdata" / "photos"
    people.mkdir(parents=True)
    theirs = [people / f"p{i}.jpg" for i in range(2)]
    for source, target in zip(public, theirs, strict=False):
        target.write_bytes(source.read_bytes())
    cache = open_cache(model, tmp_path / "cache")
    fill_cache(cache, model, [*public, theirs[0]], torch.device("cpu"), progress=False)  # a mixed shard
    fill_cache(cache, model, theirs[1:], torch.device("cpu"), progress=False)  # a shard of theirs only
    assert len(list(cache.directory.glob("shard-*.npy"))) == 2
    row = cache.index[FeatureCache.key(theirs[0])][1]

    assert features.drop_cached_under(tmp_path / "cache", people) == 2
    again = open_cache(model, tmp_path / "cache")
    assert set(again.index) == {FeatureCache.key(p) for p in public}
    assert not np.load(cache.directory / "shard-0.npy")[row].any()  # overwritten, not just unindexed
    assert not (cache.directory / "shard-1.npy").exists()
    torch.testing.assert_close(torch.from_numpy(again.get(public)).float(),
                               torch.from_numpy(direct_features(model, public)).float(), rtol=0, atol=1e-3)
    assert features.drop_cached_under(tmp_path / "cache", people) == 0


def test_probing_the_feature_shape_leaves_the_encoder_alone(tmp_path: Path) -> None:
    model = tiny_model(fine_tune_blocks=1)
    model.encoder.train()
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    cache = open_cache(model, tmp_path / "cache")
    assert (cache.regions, cache.dim) == (16, 64)  # the frozen part's 4x4 maps: the top stage runs per step
    assert model.encoder.training
    for key, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, stats[key])


def test_fit_with_zero_epochs_only_fills_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How to fill the cache with one process before a torchrun job: `fit ... --epochs 0`."""
    from tests.test_train_support import tiny_fit_args
    from train import metrics
    from train.__main__ import main

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    data = make_flickr(tmp_path / "data", n_train=2, n_val=1)
    assert main(tiny_fit_args(f"flickr:{data}", tmp_path / "run", tmp_path / "cache", epochs=0)) == 0
    assert not (tmp_path / "run" / "last").exists()
    (folder,) = (tmp_path / "cache").iterdir()
    paths = [r.path for s in ("train", "val") for r in load_dataset(f"flickr:{data}").split(s)]
    assert FeatureCache(folder, 4, 64).missing(paths) == []
    reads = CountingReads()
    monkeypatch.setattr(features, "_read", reads)
    assert main(tiny_fit_args(f"flickr:{data}", tmp_path / "run", tmp_path / "cache", epochs=1)) == 0
    assert reads.count == 0  # the training run found every image's features in the cache


def test_encoder_fingerprint_does_not_depend_on_the_thread_count() -> None:
    import torch

    from captioner.checkpoint import CaptionModel
    from captioner.vocab import Vocabulary
    from tests.helpers import tiny_config
    from train.features import encoder_fingerprint

    model = CaptionModel.create(tiny_config(), Vocabulary())
    threads = torch.get_num_threads()
    try:
        first = encoder_fingerprint(model)
        torch.set_num_threads(1)
        assert encoder_fingerprint(model) == first
    finally:
        torch.set_num_threads(threads)


def test_a_fine_tuned_encoder_caches_its_frozen_part_and_runs_its_top_blocks(tmp_path: Path) -> None:
    model, paths = tiny_model(fine_tune_blocks=1), image_paths(tmp_path, n_train=3)
    images = {p.name: p for p in paths}
    source = features.feature_source(model, images, torch.device("cpu"), str(tmp_path / "cache"))
    (folder,) = (tmp_path / "cache").iterdir()
    assert "-stages3-" in folder.name  # stem and stages 0-2 cached, stage 3 is fine-tuned
    ids = sorted(images)
    torch.testing.assert_close(source(ids), torch.from_numpy(direct_features(model, [images[i] for i in ids])).float(),
                               rtol=0, atol=2e-2)
    # Gradients reach the unfrozen stage only.
    source(ids, grad=True).square().mean().backward()
    for name, param in model.encoder.backbone.named_parameters():
        assert (param.grad is not None) == name.startswith("stages.3."), name
    # A training step on the top stage: the cached maps stay valid (same folder, nothing recomputed)
    # and the features follow the new weights.
    with torch.no_grad():
        for param in model.encoder.backbone.stages[3].parameters():
            param.mul_(1.5)
    again = features.feature_source(model, images, torch.device("cpu"), str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == [folder]
    expected = torch.from_numpy(direct_features(model, [images[i] for i in ids])).float()
    assert not torch.allclose(source(ids), torch.from_numpy(direct_features(tiny_model(), [images[i] for i in ids]))
                              .float(), atol=2e-2)
    torch.testing.assert_close(again(ids), expected, rtol=0, atol=2e-2)
    torch.testing.assert_close(source(ids), expected, rtol=0, atol=2e-2)


def test_photos_held_in_memory_for_a_fine_tuned_encoder_run_its_top_blocks(tmp_path: Path) -> None:
    model, paths = tiny_model(fine_tune_blocks=1), image_paths(tmp_path, n_train=2)
    images = {p.name: p for p in paths}
    source = FeatureSource(model, {}, None, torch.device("cpu"))
    source.add_in_memory(images)
    assert source.table is not None and source.table.shape[1:] == (16, 64)
    ids = sorted(images)
    torch.testing.assert_close(source(ids), torch.from_numpy(direct_features(model, [images[i] for i in ids])).float(),
                               rtol=0, atol=2e-2)


def test_a_fine_tuned_encoder_with_a_cache_probes_its_map_size_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is a forward pass of a whole image (224 px for the shipped encoders): one is enough."""
    model, paths = tiny_model(fine_tune_blocks=1), image_paths(tmp_path, n_train=2)
    probe, probes = features._cached_shape, []
    monkeypatch.setattr(features, "_cached_shape", lambda m: probes.append(m) or probe(m))
    source = features.feature_source(model, {p.name: p for p in paths}, torch.device("cpu"), str(tmp_path / "cache"))
    assert len(probes) == 1
    assert source.grid == probe(model)[0]
