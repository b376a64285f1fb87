"""Dataset readers (Flickr layout, Karpathy splits, official COCO captions) and what fit builds from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from captioner.vocab import Vocabulary, tokenize
from tests.helpers import SHARED_FLICKR8K
from tests.test_train_support import CAPTIONS, VAL_ONLY_WORD, make_coco, make_flickr, make_karpathy
from train.data import DatasetError, ImageRecord, load_dataset, write_linked
from train.fit import TrainConfig, prepare_model
from train.loop import bucketed_batches, build_examples


def test_flickr_layout(tmp_path: Path) -> None:
    root = make_flickr(tmp_path / "f8k", n_train=3, n_val=2)
    (root / "test.txt").write_text("val_1.jpg\nmissing.jpg\n")  # any split S reads S.txt
    dataset = load_dataset(f"flickr:{root}", ("train", "val", "test"))
    assert dataset.split_names == ["test", "train", "val"]
    train = dataset.split("train")
    assert [r.image_id for r in train] == ["train_0.jpg", "train_1.jpg", "train_2.jpg"]
    assert all(r.path == root / "images" / r.image_id and r.path.is_file() for r in train)
    assert len(train[0].captions) == 5 and train[0].captions[0] == CAPTIONS[0]
    assert [r.image_id for r in dataset.split("val")] == ["val_0.jpg", "val_1.jpg"]
    # Images without captions (missing.jpg) are left out; a caption for no split is ignored.
    assert [r.image_id for r in dataset.split("test")] == ["val_1.jpg"]
    with pytest.raises(DatasetError, match="no split 'dev'"):
        dataset.split("dev")
    with pytest.raises(DatasetError, match=r"dev\.txt"):
        load_dataset(f"flickr:{root}", ("dev",))
    other = tmp_path / "other-images"
    assert load_dataset(f"flickr:{root}@{other}", ("val",)).split("val")[0].path == other / "val_0.jpg"


def test_flickr_captions_header_is_checked(tmp_path: Path) -> None:
    root = make_flickr(tmp_path / "f8k")
    (root / "captions.txt").write_text("file,text\nval_0.jpg,a dog\n")
    with pytest.raises(DatasetError, match="image,caption"):
        load_dataset(f"flickr:{root}")


def test_write_linked_links_every_photo_and_rewrites_only_the_named_split(tmp_path: Path) -> None:
    source = load_dataset(f"flickr:{make_flickr(tmp_path / 'f8k', n_train=3, n_val=2)}")
    out = tmp_path / "out"
    counts = write_linked(source, out, ["train", "val"],
                          {"train": lambda records: [ImageRecord(r.image_id, r.path, ("new words",)) for r in records]})
    assert counts == {"train": 3, "val": 2}
    written = load_dataset(f"flickr:{out}")
    assert all(r.captions == ("new words",) for r in written.split("train"))
    assert [r.captions for r in written.split("val")] == [r.captions for r in source.split("val")]
    for record in written.split("train") + written.split("val"):
        original = tmp_path / "f8k" / "images" / record.image_id
        assert record.path.is_symlink() and record.path.read_bytes() == original.read_bytes()


def test_write_linked_refuses_a_folder_of_real_photos_before_rewriting_any_split(tmp_path: Path) -> None:
    source = load_dataset(f"flickr:{make_flickr(tmp_path / 'f8k', n_train=2, n_val=1)}")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "val_0.jpg").write_bytes(b"a photo someone keeps")  # the last photo to link
    rewritten: list[str] = []

    def rewrite(records: list[ImageRecord]) -> list[ImageRecord]:
        rewritten.extend(r.image_id for r in records)
        return records

    with pytest.raises(FileExistsError, match="not a link"):
        write_linked(source, out, ["train", "val"], {"train": rewrite})
    assert rewritten == [] and not (out / "captions.txt").exists()
    assert (out / "images" / "val_0.jpg").read_bytes() == b"a photo someone keeps"


def test_write_linked_refuses_the_folder_of_the_captions_it_reads(tmp_path: Path) -> None:
    """Its photos elsewhere (FOLDER@ROOT), the source's own folder holds no photo to refuse: its
    captions must not be overwritten all the same."""
    folder = make_flickr(tmp_path / "f8k", n_train=2, n_val=1)
    (folder / "images").rename(tmp_path / "photos")
    before = (folder / "captions.txt").read_bytes()
    source = load_dataset(f"flickr:{folder}@{tmp_path / 'photos'}")
    with pytest.raises(FileExistsError, match="captions of the dataset being read"):
        write_linked(source, folder, ["train", "val"], {})
    assert (folder / "captions.txt").read_bytes() == before and not (folder / "images").exists()


def test_karpathy_restval_joins_train(tmp_path: Path) -> None:
    file = make_karpathy(tmp_path / "coco")
    dataset = load_dataset(f"karpathy:{file}", ("train", "val", "test"))
    train = dataset.split("train")
    # 2 train + 1 restval + 1 Flickr-style entry (no filepath, tokens only).
    assert len(train) == 4
    assert "val2014/COCO_val2014_000000000002.jpg" in {r.image_id for r in train}
    assert {r.image_id for r in dataset.split("val")} == {"val2014/COCO_val2014_000000000003.jpg"}
    assert {r.image_id for r in dataset.split("test")} == {"val2014/COCO_val2014_000000000004.jpg"}
    # Without @IMAGE_ROOT, images are looked up next to the split file.
    assert all(r.path == file.parent / r.image_id for r in train)
    flat = next(r for r in train if r.image_id == "flat.jpg")
    assert flat.captions == ("a cat on grass",)  # joined tokens when there is no raw text
    first = next(r for r in train if r.image_id.endswith("000000000000.jpg"))
    assert len(first.captions) == 5 and first.captions[0] == CAPTIONS[0]
    root = tmp_path / "coco" / "images"
    moved = load_dataset(f"karpathy:{file}@{root}", ("train", "val"))
    assert moved.split("val")[0].path == root / "val2014" / "COCO_val2014_000000000003.jpg"
    assert all(r.path.is_file() for r in [*moved.split("train"), *moved.split("val")])


def test_karpathy_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read Karpathy"):
        load_dataset(f"karpathy:{tmp_path / 'nope.json'}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read Karpathy"):
        load_dataset(f"karpathy:{tmp_path / 'bad.json'}")


def test_official_coco_captions(tmp_path: Path) -> None:
    annotations = make_coco(tmp_path / "coco")
    dataset = load_dataset(f"coco:{annotations}", ("train", "val"))  # train -> captions_train2017.json
    train, val = dataset.split("train"), dataset.split("val")
    assert [r.image_id for r in train] == [f"train2017/{i:012d}.jpg" for i in (1, 2, 3)]
    assert [r.image_id for r in val] == [f"val2017/{i:012d}.jpg" for i in (1001, 1002)]
    assert all(r.path.is_file() and r.path.parent == tmp_path / "coco" / r.image_id.split("/")[0]
               for r in [*train, *val])
    assert len(train[0].captions) == 5 and train[0].captions[0] == CAPTIONS[0]  # trailing newline stripped
    full = load_dataset(f"coco:{annotations}", ("val2017",)).split("val2017")
    assert [r.image_id for r in full] == [r.image_id for r in val]
    elsewhere = load_dataset(f"coco:{annotations}@{tmp_path / 'x'}", ("val",)).split("val")[0]
    assert elsewhere.path == tmp_path / "x" / "val2017" / "000000001001.jpg"
    with pytest.raises(DatasetError, match=r"captions_test2017\.json"):
        load_dataset(f"coco:{annotations}", ("test",))


@pytest.mark.parametrize("spec, message", [
    ("flickr", "FORMAT:PATH"),
    ("flickr:", "FORMAT:PATH"),
    ("tfrecord:/data", "unknown dataset format 'tfrecord'"),
    ("flickr:/does/not/exist", "captions.txt"),
])
def test_bad_dataset_specs(spec: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_vocabulary_comes_from_the_training_split_only(tmp_path: Path) -> None:
    root = make_flickr(tmp_path / "f8k")
    dataset = load_dataset(f"flickr:{root}")
    assert any(VAL_ONLY_WORD in tokenize(c) for r in dataset.split("val") for c in r.captions)
    cfg = TrainConfig(data=f"flickr:{root}", min_freq=1, model={"encoder": "tiny", "image_size": 64})
    vocab = prepare_model(cfg, dataset).vocab
    train_words = {w for r in dataset.split("train") for c in r.captions for w in tokenize(c)}
    assert set(vocab.words[4:]) == train_words
    assert VAL_ONLY_WORD not in vocab and "near" not in vocab
    # Captions are tokenised by the vocabulary's tokeniser: case and punctuation variants are one word.
    assert "." not in vocab and "DOG" not in vocab and "dog" in vocab
    # The frequency cut-off counts training captions only (each caption appears 5 times).
    rare = prepare_model(TrainConfig(min_freq=6, model={"encoder": "tiny"}), dataset).vocab
    assert set(rare.words[4:]) == {w for w in train_words if sum(
        tokenize(c).count(w) for r in dataset.split("train") for c in r.captions) >= 6}


def test_build_examples_cuts_long_captions_and_skips_empty_ones() -> None:
    vocab = Vocabulary.build(["a dog runs on the grass"], min_freq=1)
    records = [ImageRecord("x", Path("x.jpg"), ("a dog runs on the grass", "!!!", "a dog"))]
    examples = build_examples(records, vocab, max_len=3)
    assert [vocab.decode(e.tokens) for e in examples] == [["a", "dog", "runs"], ["a", "dog"]]
    assert all(e.tokens[0] == vocab.start_id and e.tokens[-1] == vocab.end_id for e in examples)
    assert len(examples[0].tokens) == 5  # <start> + 3 words + <end>
    exact = build_examples([ImageRecord("y", Path("y.jpg"), ("a dog runs",))], vocab, max_len=3)
    assert vocab.decode(exact[0].tokens) == ["a", "dog", "runs"] and len(exact[0].tokens) == 5


def test_bucketed_batches_cover_every_example_once() -> None:
    vocab = Vocabulary.build(["a b c d e f g h"], min_freq=1)
    rng = np.random.default_rng(0)
    texts = [" ".join("abcdefgh"[: int(n)]) for n in rng.integers(1, 9, 1000)]
    records = [ImageRecord(str(i), Path(f"{i}.jpg"), (t,)) for i, t in enumerate(texts)]
    examples = build_examples(records, vocab, 40)
    batches = bucketed_batches(examples, 16, np.random.default_rng(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(examples)))
    assert len(batches) == -(-len(examples) // 16) and max(len(b) for b in batches) == 16
    spread = np.mean([max(len(examples[i].tokens) for i in b) - min(len(examples[i].tokens) for i in b)
                      for b in batches])
    assert spread < 1.0  # similar lengths in a batch: little padding
    assert batches != bucketed_batches(examples, 16, np.random.default_rng(2))


@pytest.mark.shared_data
def test_shared_flickr8k_reads() -> None:
    if not (SHARED_FLICKR8K / "captions.txt").is_file():
        pytest.skip(f"shared Flickr8k data not found at {SHARED_FLICKR8K} (only on the project's machines)")
    dataset = load_dataset(f"flickr:{SHARED_FLICKR8K}")
    train, val = dataset.split("train"), dataset.split("val")
    assert (len(train), len(val)) == (6000, 1000)
    assert all(len(r.captions) == 5 for r in [*train, *val])
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    assert train[0].path.is_file()
