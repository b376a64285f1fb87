"""Readers for the caption datasets people download, named on the command line as FORMAT:PATH.

- ``flickr:DIR``   DIR/captions.txt (``image,caption`` CSV with header), DIR/images/, DIR/SPLIT.txt
- ``karpathy:FILE[@IMAGE_ROOT]``  Karpathy's dataset_{coco,flickr8k,flickr30k}.json; ``restval``
  joins ``train``; images under IMAGE_ROOT (default: the folder of FILE, plus ``filepath``)
- ``coco:ANNOTATIONS_DIR[@IMAGE_ROOT]``  official ``captions_SPLIT.json`` files; SPLIT is e.g.
  ``train2017``/``val2017``; images under IMAGE_ROOT/SPLIT (default: ANNOTATIONS_DIR/..)
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_text


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # unique within the dataset (a file name or a relative path)
    path: Path
    captions: tuple[str, ...]


class CaptionDataset:
    """Images with their reference captions, split by name (train, val, ...)."""

    def __init__(self, name: str, splits: dict[str, list[ImageRecord]], folder: Path | None = None) -> None:
        self.name = name
        self._splits = splits
        self.folder = folder  # where a Flickr-layout dataset's captions.txt and split lists are

    @property
    def split_names(self) -> list[str]:
        return sorted(self._splits)

    def split(self, name: str) -> list[ImageRecord]:
        if name not in self._splits:
            raise DatasetError(f"{self.name} has no split {name!r}; it has {', '.join(self.split_names)}")
        return self._splits[name]


def parse_spec(spec: str) -> tuple[str, Path, Path | None]:
    """``FORMAT:PATH[@IMAGE_ROOT]`` (see the module docstring) -> (format, path, image root or None)."""
    fmt, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DatasetError(f"dataset must be FORMAT:PATH ({', '.join(READERS)}), got {spec!r}")
    if fmt not in READERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; use one of {', '.join(READERS)}")
    path, _, root = rest.partition("@")
    return fmt, Path(path), Path(root) if root else None


def load_dataset(spec: str, splits: tuple[str, ...] = ("train", "val")) -> CaptionDataset:
    """Read ``FORMAT:PATH`` (see the module docstring), keeping only ``splits``."""
    fmt, path, root = parse_spec(spec)
    return READERS[fmt](path, splits, root)


def load_to_rewrite(spec: str, splits: Sequence[str], changed: str, what: str) -> CaptionDataset:
    """``spec``'s ``splits``, read to be written again with the ``changed`` split altered (``what``:
    how, for the error when that split is not among those written)."""
    if changed not in splits:
        raise ValueError(f"the split {what} ({changed}) must be one of the splits written")
    return load_dataset(spec, tuple(splits))


def read_flickr(directory: Path, splits: tuple[str, ...], image_root: Path | None = None) -> CaptionDataset:
    captions_file = directory / "captions.txt"
    if not captions_file.is_file():
        raise DatasetError(f"{captions_file} not found (expected the Flickr layout)")
    captions: dict[str, list[str]] = defaultdict(list)
    with captions_file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{captions_file} must have an 'image,caption' header")
        for row in reader:
            if row["caption"] and row["caption"].strip():
                captions[row["image"].strip()].append(row["caption"].strip())
    images = image_root or directory / "images"
    result: dict[str, list[ImageRecord]] = {}
    for split in splits:
        split_file = directory / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"split file {split_file} not found")
        names = [n.strip() for n in split_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        result[split] = [ImageRecord(n, images / n, tuple(captions[n])) for n in names if captions.get(n)]
    return CaptionDataset(f"flickr:{directory}", result, directory)


def write_flickr(directory: Path, splits: Mapping[str, Sequence[ImageRecord]]) -> str:
    """Write ``splits`` as the Flickr layout ``read_flickr`` reads (captions.txt and SPLIT.txt); the
    images are the caller's to put at ``directory/images/IMAGE_ID``. Returns the ``flickr:`` spec."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "caption"])
    for records in splits.values():
        writer.writerows((r.image_id, c) for r in records for c in r.captions)
    atomic_write_text(directory / "captions.txt", buffer.getvalue())
    for split, records in splits.items():
        atomic_write_text(directory / f"{split}.txt", "".join(f"{r.image_id}\n" for r in records))
    return f"flickr:{directory}"


def write_linked(dataset: CaptionDataset, out: Path, splits: Sequence[str],
                 rewrite: Mapping[str, Callable[[list[ImageRecord]], list[ImageRecord]]]) -> dict[str, int]:
    """Write ``dataset``'s ``splits`` to ``out`` in the Flickr layout, every photo linked (never copied),
    each split named in ``rewrite`` replaced by what its function returns for the split's records.

    All photos are linked before any function runs, so a folder of real photos (the source itself) is
    refused before anything is written into it; so is the folder of the source's captions, also when
    its photos are elsewhere (``flickr:DIR@ROOT``) or links. Returns the number of images per split written."""
    if dataset.folder is not None and out.resolve() == dataset.folder.resolve():
        raise FileExistsError(f"{out} holds the captions of the dataset being read: write to a new folder")
    for name in splits:
        for record in dataset.split(name):
            link_image(record.path, out / "images" / record.image_id)
    written = {name: rewrite[name](dataset.split(name)) if name in rewrite else dataset.split(name)
               for name in splits}
    write_flickr(out, written)
    return {name: len(records) for name, records in written.items()}


def link_image(target: Path, link: Path) -> None:
    """``link`` -> ``target``: a dataset written from another one links its photos, never copies them.

    A link to elsewhere is replaced; a real file is never touched (the folder written must be a new
    one, or one a command wrote, never the source dataset itself)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} is a file, not a link this command made: write to a new folder")
    link.symlink_to(target.resolve())


def read_karpathy(file: Path, splits: tuple[str, ...], image_root: Path | None = None) -> CaptionDataset:
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read Karpathy split file {file}: {err}") from err
    root = image_root or file.parent
    result: dict[str, list[ImageRecord]] = {s: [] for s in splits}
    for image in document.get("images", []):
        split = "train" if image.get("split") == "restval" else image.get("split")
        if split not in result:
            continue
        relative = Path(image.get("filepath", "")) / image["filename"]
        texts = tuple(s.get("raw") or " ".join(s.get("tokens", [])) for s in image.get("sentences", []))
        if texts:
            result[split].append(ImageRecord(str(relative), root / relative, texts))
    return CaptionDataset(f"karpathy:{file}", result)


def read_coco(directory: Path, splits: tuple[str, ...], image_root: Path | None = None) -> CaptionDataset:
    """Official COCO captions; split names map to files: val -> val2017 unless given in full."""
    root = image_root or directory.parent
    result: dict[str, list[ImageRecord]] = {}
    for split in splits:
        full = split if split[-4:].isdigit() else f"{split}2017"
        file = directory / f"captions_{full}.json"
        if not file.is_file():
            raise DatasetError(f"COCO annotations {file} not found")
        document = json.loads(file.read_text(encoding="utf-8"))
        texts: dict[int, list[str]] = defaultdict(list)
        for ann in document.get("annotations", []):
            texts[ann["image_id"]].append(ann["caption"].strip())
        result[split] = [
            ImageRecord(f"{full}/{img['file_name']}", root / full / img["file_name"], tuple(texts[img["id"]]))
            for img in document.get("images", []) if texts.get(img["id"])
        ]
    return CaptionDataset(f"coco:{directory}", result)


# The dataset formats a spec may name, and their readers (defined above).
READERS: dict[str, Callable[[Path, tuple[str, ...], Path | None], CaptionDataset]] = {
    "flickr": read_flickr, "karpathy": read_karpathy, "coco": read_coco}
