"""Distillation: what an ensemble of models knows, taught to one decoder.

Two decoders trained separately caption better together (``python -m train evaluate --ensemble``)
than either alone, but shipping both doubles the model's size and decoding time. Distillation
gets much of the gain into one decoder (the student), in one of two ways:

- word level, ``python -m train fit --init-from STUDENT --distill-from A,B``: while the student
  is trained on the references, each word's target is mixed with the ensemble's (the teacher's)
  distribution over the vocabulary (:class:`WordDistillation`; Hinton et al. 2015, "Distilling
  the Knowledge in a Neural Network");
- sequence level, ``python -m train distill``: the teacher captions every training photo with
  beam search, and the student is trained on those captions with the usual ``python -m train fit
  --init-from STUDENT --data flickr:OUT`` (Kim & Rush 2016, "Sequence-Level Knowledge
  Distillation").

``python -m train distill`` writes a Flickr-layout dataset (``captions.txt``, one ``SPLIT.txt``
per split, ``images/`` with links to the photos, nothing copied):

- the distilled split's captions are the teacher's, one per photo, followed by the photo's own
  references when ``--keep-references`` is given;
- the other splits are copied unchanged, so students are selected on the same photos;
- ``teacher.json`` records the teachers, the decoding settings and each photo's caption. It is
  rewritten after every batch, so an interrupted run resumes where it stopped; a run with other
  teachers (by version) or settings refuses to mix its captions in.

Run: python -m train distill --data flickr:data/flickr8k-mirror --teacher runs/a/best --teacher runs/b/best \\
         --out data/flickr8k-distilled
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.checkpoint import CaptionModel
from captioner.ensemble import aligned_decoder, ensemble_of, same_features
from captioner.inference import beam_config_from_meta, resolve_device
from captioner.model import Decoder
from common.atomic import atomic_write_text

from .cli import DEVICE_HELP, comma_list
from .data import ImageRecord, load_to_rewrite, write_linked
from .evaluate import beam_from_args
from .features import feature_source
from .loop import Example, pad, reference_terms
from .scoring import DECODE_BATCH, decode_captions

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.json"


class DistillError(RuntimeError):
    """The output folder holds another teacher's captions."""


def distillation_fact(paths: str, weight: float) -> dict[str, Any]:
    """A student's ``meta["distillation"]``: which models taught it (by version), with what weight."""
    return {"kind": "word", "teachers": [checkpoint.version_of(p) for p in comma_list(paths)], "weight": weight}


@dataclass
class TeacherGroup:
    """Frozen teachers that read the same features, and where those come from."""

    decoders: list[Decoder]
    # None: the student's own features. Otherwise the group's first teacher, whose frozen public
    # encoder gives the features they were trained on, when the student's differ: its top blocks
    # are being fine-tuned, or it attends over another grid or backbone.
    features_model: CaptionModel | None


def load_teachers(paths: Sequence[str], student: CaptionModel, device: torch.device) -> list[TeacherGroup]:
    """The teachers on ``device``, frozen, their word rows in the student's order, grouped by the
    features they read (in the order first given), so that each group's features are read once a batch.

    Each teacher must read a public encoder's features; teachers on other grids or backbones than
    the student's, or than each other's, read their own.
    """
    models = [checkpoint.load(path, device) for path in paths]
    if not models:
        raise ValueError("word-level distillation needs at least one teacher checkpoint")
    groups: list[tuple[CaptionModel, list[Decoder]]] = []
    for model in models:
        if model.config.fine_tune_blocks:
            raise ValueError(f"teacher {model.version} has a fine-tuned encoder: teachers must read a public "
                             "encoder's features")
        decoder = aligned_decoder(model, student.vocab).eval()
        decoder.requires_grad_(False)
        group = next((decoders for first, decoders in groups if same_features(first, model)), None)
        if group is None:
            groups.append((model, [decoder]))
        else:
            group.append(decoder)
    return [TeacherGroup(decoders, None if same_features(student, first) else first) for first, decoders in groups]


@dataclass
class WordDistillation:
    """Teacher forcing on the references, each word's target mixed with the teacher's distribution.

    loss = (1 - weight) * cross-entropy(references) + weight * cross-entropy(teacher's distribution)
           + alpha_c * the attention penalty

    The teacher's distribution is the mean of its members' (each fed the same reference prefix, in
    eval mode, each on the features it was trained on). Reported: the references' cross-entropy, so
    the history compares with plain ``fit``.
    """

    # Each group: teachers that read the same features, and where those come from for a batch's
    # image ids (None: the student's; a :attr:`TeacherGroup.features_model`'s otherwise).
    groups: Sequence[tuple[list[Decoder], Callable[[Sequence[str]], Tensor] | None]]
    weight: float
    pad_id: int
    alpha_c: float
    name: str = "loss"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError("the distillation weight must be between 0 and 1")

    @property
    def teachers(self) -> list[Decoder]:
        return [decoder for decoders, _ in self.groups for decoder in decoders]

    def __call__(self, decoder: nn.Module, features: Tensor, batch: Sequence[Example]) -> tuple[Tensor, Tensor]:
        tokens = pad([e.tokens for e in batch], self.pad_id).to(features.device)
        logits, alphas = decoder(features, tokens)
        references, penalty = reference_terms(logits, alphas, tokens, self.pad_id, self.alpha_c, 0.0)
        mask = tokens[:, 1:] != self.pad_id
        log_probs = F.log_softmax(logits.float(), dim=-1)
        ids = [e.image_id for e in batch]
        views = [features if source is None else source(ids) for _, source in self.groups]
        taught = -(self.teacher_probabilities(views, tokens) * log_probs).sum(dim=-1)[mask].mean()
        return (1 - self.weight) * references + self.weight * taught + penalty, references

    @torch.no_grad()
    def teacher_probabilities(self, features: Sequence[Tensor], tokens: Tensor) -> Tensor:
        """The mean of the teachers' word distributions, each group's teachers on its ``features[i]``."""
        return torch.stack([F.softmax(t(f, tokens)[0].float(), dim=-1)
                            for (decoders, _), f in zip(self.groups, features, strict=True)
                            for t in decoders]).mean(dim=0)


def teacher_captions(teachers: Sequence[str], records: Sequence[ImageRecord], beam: BeamConfig, out: Path,
                     device: str = "auto", cache: str | None = "cache/features",
                     batch_size: int = DECODE_BATCH) -> dict[str, str]:
    """Image id -> the ensemble's caption for every record, resuming from ``out/teacher.json``."""
    target = resolve_device(device)
    models = [checkpoint.load(path, target) for path in teachers]
    decoder = ensemble_of(models)
    # Teachers are matched by version, not by the path they were given as (another working
    # directory, or a copy of the same model, names them differently).
    manifest = {"teachers": [m.version for m in models], "decoding": asdict(beam)}
    done = _resume(out / TEACHER_FILE, manifest)
    todo = [r for r in records if r.image_id not in done]
    if done:
        log.info("resuming: %d of %d photos already captioned by the teacher", len(records) - len(todo),
                 len(records))
    source = feature_source(models[0], {r.image_id: r.path for r in todo}, target, cache)
    for start in range(0, len(todo), batch_size):
        chunk = [r.image_id for r in todo[start:start + batch_size]]
        done.update(decode_captions(models[0], source, chunk, beam, batch_size, decoder))
        _save(out / TEACHER_FILE, manifest, done, teachers)
        log.info("teacher captions: %d/%d photos", len(records) - len(todo) + start + len(chunk), len(records))
    return {r.image_id: done[r.image_id] for r in records}


def _resume(file: Path, manifest: dict[str, Any]) -> dict[str, str]:
    if not file.is_file():
        return {}
    saved = json.loads(file.read_text(encoding="utf-8"))
    if {k: saved.get(k) for k in manifest} != manifest:
        raise DistillError(f"{file} holds captions of other teachers or decoding settings "
                           f"({saved.get('teachers')}, {saved.get('decoding')}): write to a new folder")
    return dict(saved.get("captions", {}))


def _save(file: Path, manifest: dict[str, Any], captions: dict[str, str], paths: Sequence[str]) -> None:
    document = {**manifest, "teacher_paths": list(paths),
                "updated": datetime.now(UTC).isoformat(timespec="seconds"), "captions": captions}
    atomic_write_text(file, json.dumps(document, indent=0, ensure_ascii=False) + "\n")


def write_distilled(spec: str, teachers: Sequence[str], out: Path, beam: BeamConfig,
                    splits: Sequence[str] = ("train", "val"), distill_split: str = "train",
                    keep_references: bool = False, device: str = "auto", cache: str | None = "cache/features",
                    batch_size: int = DECODE_BATCH) -> dict[str, int]:
    """Write ``spec``'s ``splits`` to ``out`` in the Flickr layout, ``distill_split``'s captions written by
    the ensemble of ``teachers``. Returns the number of images per split written."""
    dataset = load_to_rewrite(spec, splits, distill_split, "to distill")
    out.mkdir(parents=True, exist_ok=True)

    def with_teacher_captions(records: list[ImageRecord]) -> list[ImageRecord]:
        captions = teacher_captions(teachers, records, beam, out, device, cache, batch_size)
        return [ImageRecord(r.image_id, r.path, (captions[r.image_id], *(r.captions if keep_references else ())))
                for r in records]

    return write_linked(dataset, out, splits, {distill_split: with_teacher_captions})


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("distill", help="write a dataset whose training captions an ensemble of models wrote",
                            description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", required=True, help="the dataset, FORMAT:PATH as for fit")
    parser.add_argument("--teacher", action="append", required=True, metavar="CHECKPOINT",
                        help="a model of the teacher ensemble (repeat; same encoder and words; the first "
                             "one's decoding settings are the default)")
    parser.add_argument("--out", required=True, type=Path, help="the Flickr-layout folder to write")
    parser.add_argument("--splits", default="train,val", help="splits to write, comma-separated")
    parser.add_argument("--distill-split", default="train", help="the split whose captions the teacher writes")
    parser.add_argument("--keep-references", action="store_true",
                        help="keep each photo's own captions after the teacher's")
    parser.add_argument("--beam", type=int, default=None, metavar="K", help="the teacher's beam size")
    parser.add_argument("--max-len", type=int, default=None, metavar="N", help="longest caption in words")
    parser.add_argument("--length-penalty", type=float, default=None, metavar="X",
                        help="length normalisation exponent")
    parser.add_argument("--block-ngram", type=int, default=None, metavar="N",
                        help="forbid repeating an n-gram of this size")
    parser.add_argument("--batch-size", type=int, default=DECODE_BATCH, metavar="N", help="photos decoded together")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--cache", default="cache/features", metavar="DIR",
                        help="encoder feature cache folder (shared with fit)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = comma_list(args.splits)
    meta = checkpoint.read_document(args.teacher[0]).get("meta", {})
    beam = beam_from_args(args, beam_config_from_meta(meta))
    counts = write_distilled(args.data, args.teacher, args.out, beam, splits, args.distill_split,
                             args.keep_references, args.device, args.cache, args.batch_size)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items())
          + f"; train a student on it with: python -m train fit --data flickr:{args.out} --init-from STUDENT ...")
    return 0
