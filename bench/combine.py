"""Is anything left to gain from the students we have? Four ways of combining, against the model alone.

Seeds of one distillation recipe (v5's and v7's) differ by about as much as the recipes tried
after them. When models differ by chance, combining them usually gains: if it does not, they are
limited by what they learned from (the data), not by the noise of one run. Every row decodes the
same split at the model's shipped decoding and is scored with pycocoevalcap, as a ratio to the
model alone, measured in the same run:

- ``member``: the model, and each ``--member``, alone;
- ``weights averaged``: one decoder whose weights are the mean of theirs (a "model soup",
  Wortsman et al. 2022: students fine-tuned from one start usually sit in one basin of the loss);
  the same size and cost as one model;
- ``ensemble``: the decoders decoding as one, the mean of their word distributions
  (``captioner/ensemble.py``, as ``train evaluate --ensemble``); each member's size and time;
- ``both views``: the model alone on the photo and on its mirror image, the mean of its two word
  distributions (test-time augmentation; the students were trained on mirrored photos too);
- ``consensus``: the model's final beams reranked by their mean CIDEr-D against each other
  (consensus reranking, as Devlin et al. 2015 did with neighbours' captions): the caption most of
  its beams agree with, rather than the single most probable one.

Run: python bench/combine.py --member runs/other/best [--member ...] [--model CHECKPOINT]
         [--data flickr:../shared/data/flickr8k] [--cache ../cache/features]
Writes bench/results/combine.json. The mirrored photos are written once under the cache folder
(``mirrored-photos/``, so that their features are cached like any photo's), or to a temporary
folder without a cache.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, add_split_options, metric_ratios, relative_spec, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig, Hypothesis, beam_search, n_best  # noqa: E402
from captioner.checkpoint import CaptionModel  # noqa: E402
from captioner.ensemble import DecoderEnsemble, check_same_features  # noqa: E402
from captioner.inference import beam_config_from_meta, resolve_device  # noqa: E402
from train import metrics  # noqa: E402
from train.cider import CiderD  # noqa: E402
from train.data import ImageRecord, load_dataset  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.features import feature_source  # noqa: E402
from train.scst import special_ids  # noqa: E402

DECODE_BATCH = 100


def averaged_weights(paths: Sequence[str | None]) -> CaptionModel:
    """One model whose decoder's weights are the mean of the checkpoints' (same features, architecture
    and words: the frozen public encoder is the same in all of them)."""
    models = [checkpoint.load(path) for path in paths]
    first = models[0]
    for other in models[1:]:
        check_same_features(first, other)
        if other.config != first.config or other.vocab.words != first.vocab.words:
            raise SystemExit(f"{other.version} and {first.version} differ in architecture or words: "
                             "their weights cannot be averaged")
    states = [m.decoder.state_dict() for m in models]
    first.decoder.load_state_dict({name: torch.stack([s[name].float() for s in states]).mean(dim=0).to(tensor.dtype)
                                   for name, tensor in states[0].items()})
    first.meta = {"version": "mean of " + " + ".join(m.version for m in models)}
    return first


class ViewEnsemble(DecoderEnsemble):
    """Decoders each reading its own view: the features of all views concatenated on the last dimension."""

    def member_features(self, features: Tensor) -> list[Tensor]:
        return list(features.chunk(len(self.members), dim=-1))


@contextlib.contextmanager
def mirrored_photos(records: Sequence[ImageRecord], cache: str | None, split: str) -> Iterator[dict[str, Path]]:
    """Image id -> its photo mirrored left to right, written once (kept under the cache, if any)."""
    with contextlib.ExitStack() as stack:
        folder = (Path(cache) / "mirrored-photos" / split if cache
                  else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mirrored-"))))
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for record in records:
            target = folder / f"{record.image_id}.png"  # lossless: the mirror and nothing else
            if not target.exists():
                with Image.open(record.path) as photo:
                    ImageOps.mirror(photo.convert("RGB")).save(target)
            paths[record.image_id] = target
        yield paths


def decode_hypotheses(decode: Callable[[Tensor], list[Any]], features: Callable[[list[str]], Tensor],
                      image_ids: Sequence[str]) -> tuple[list[Any], float]:
    """``decode`` over the split, ``DECODE_BATCH`` images at a time; its outputs and the seconds it took."""
    out: list[Any] = []
    start = time.perf_counter()
    for first in range(0, len(image_ids), DECODE_BATCH):
        out += decode(features(list(image_ids[first:first + DECODE_BATCH])))
    return out, time.perf_counter() - start


def words_of(model: CaptionModel, hypothesis: Hypothesis) -> list[str]:
    return [model.vocab.words[i] for i in hypothesis.tokens]


def consensus_choices(candidates: dict[str, list[list[str]]]) -> dict[str, list[str]]:
    """Image id -> the candidate with the highest mean CIDEr-D against that image's candidates.

    The document frequencies come from all images' candidates (each image one document, as the
    references are in pycocoevalcap), so words every caption uses weigh little. A candidate is
    among its own references: the same term for each, so the choice is unchanged. Ties go to the
    beam's own order."""
    cider = CiderD(candidates)
    return {image: options[int(cider.score([image] * len(options), options).argmax())]
            for image, options in candidates.items()}


def row(kind: str, models: list[str], beam: BeamConfig, captions: dict[str, str], seconds: float,
        references: dict[str, list[str]]) -> dict[str, Any]:
    values = metrics.score(references, captions).values
    print(f"{kind:16s} {' + '.join(models)}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
    return {"kind": kind, "models": models, "decoding": asdict(beam), "n_images": len(captions),
            "metrics": values, "decode_seconds": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model (default: the bundled model)")
    parser.add_argument("--member", action="append", required=True,
                        help="another model of the same architecture and words (repeat)")
    add_split_options(parser)
    parser.add_argument("--json", type=Path, default=RESULTS / "combine.json")
    args = parser.parse_args()

    run = start_run()
    device = resolve_device(args.device)
    shipped = beam_config_from_meta(checkpoint.read_document(args.model).get("meta", {}))
    records = load_dataset(args.data, (args.split,)).split(args.split)
    if args.limit:
        records = records[:args.limit]
    references = {r.image_id: list(r.captions) for r in records}
    ids = [r.image_id for r in records]
    paths: list[str | None] = [args.model, *args.member]
    names = [checkpoint.version_of(p) for p in paths]
    rows = []

    def scored(kind: str, models: list[str], captions: dict[str, str], seconds: float) -> None:
        rows.append(row(kind, models, shipped, captions, seconds, references))

    for path, name in zip(paths, names, strict=True):
        result, info = evaluate(path, args.data, args.split, shipped, args.limit, args.device, args.cache)
        scored("member", [name], result.captions, info["decode_seconds"])
    with tempfile.TemporaryDirectory(prefix="averaged-") as folder:
        checkpoint.save(averaged_weights(paths), folder)
        result, info = evaluate(folder, args.data, args.split, shipped, args.limit, args.device, args.cache)
    scored("weights averaged", names, result.captions, info["decode_seconds"])
    result, info = evaluate(args.model, args.data, args.split, shipped, args.limit, args.device, args.cache,
                            ensemble=args.member)
    scored("ensemble", names, result.captions, info["decode_seconds"])

    model = checkpoint.load(args.model, device)
    special = special_ids(model.vocab)
    photos = feature_source(model, {r.image_id: r.path for r in records}, device, args.cache)
    with mirrored_photos(records, args.cache, args.split) as mirrored:
        mirrors = feature_source(model, mirrored, device, args.cache)
        views = ViewEnsemble([model.decoder, model.decoder])
        hyps, seconds = decode_hypotheses(lambda f: beam_search(views, f, shipped, special),
                                          lambda chunk: torch.cat([photos(chunk), mirrors(chunk)], dim=-1).float(), ids)
    scored("both views", [names[0]], {i: " ".join(words_of(model, h)) for i, h in zip(ids, hyps, strict=True)},
           seconds)
    lists, seconds = decode_hypotheses(lambda f: n_best(model.decoder, f, shipped, special),
                                       lambda chunk: photos(chunk).float(), ids)
    start = time.perf_counter()
    chosen = consensus_choices({i: [words_of(model, h) for h in beams if h.score > float("-inf")]
                                for i, beams in zip(ids, lists, strict=True)})
    seconds += time.perf_counter() - start
    scored("consensus", [names[0]], {i: " ".join(words) for i, words in chosen.items()}, seconds)

    reference = rows[0]["metrics"]
    for entry in rows:
        entry["ratio_to_model"] = metric_ratios(entry["metrics"], reference)
    write_result(args.json, {
        "benchmark": "a distilled model against its seed siblings combined four ways",
        "data": relative_spec(args.data), "split": args.split, "decoding": asdict(shipped),
        "results": rows, "context": run.context(args.device),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
