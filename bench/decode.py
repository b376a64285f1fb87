"""Decoder and encoder throughput on this machine (CPU by default; --device cuda on a GPU).

1. Beam search (beam 3) over N=32 images' precomputed features: batched (one N x k tensor
   program) vs one image at a time in a loop, with a check that the captions are identical.
2. The model's encoder alone, images/s at batch 1, 4, 8, 32, in the original layout (NCHW) and in
   the optimised one the captioner uses (channels-last), plus TorchScript-frozen with batch-norm
   folded (CPU only, what the worker serves there), and freezing's own gain (frozen over
   channels-last, same batch).
3. The encoder's FLOPs per image, counted with torch.utils.flop_counter at the run's input size,
   and a large float32 matmul's FLOP/s (the machine's ceiling), both in FLOPs (one multiply-add =
   2 FLOPs), so the encoder's share of the ceiling compares like with like.

Run: python bench/decode.py [--device cpu|cuda] [--json bench/results/decode.json]
Smoke: python bench/decode.py --checkpoint <tiny> --images 4 --batches 1 2 --seconds 0.05 --matmul-size 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, relative, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig, SpecialIds, beam_search  # noqa: E402
from captioner.checkpoint import CaptionModel  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.inference import preprocess  # noqa: E402
from captioner.model import ModelConfig  # noqa: E402
from captioner.vocab import Vocabulary  # noqa: E402

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def load_model(device: torch.device, explicit: str | None) -> tuple[CaptionModel, str]:
    if explicit:
        model = checkpoint.load(explicit, device)
        return model, f"checkpoint {relative(explicit)}"
    try:
        return checkpoint.load(None, device), "the bundled default model"
    except checkpoint.CheckpointError:
        torch.manual_seed(0)
        vocab = Vocabulary([*Vocabulary().words, *(f"w{i}" for i in range(2530))])
        model = CaptionModel.create(ModelConfig(), vocab).to(device)
        model.decoder.eval()
        return model, "a random-weight model of the default size (no bundled model yet)"


def photos(n: int, model: CaptionModel) -> tuple[torch.Tensor, str]:
    if SHARED_IMAGES.is_dir():
        files = sorted(SHARED_IMAGES.iterdir())[:n]
        images = torch.stack([preprocess(model, load_image(f.read_bytes())) for f in files])
        return images, f"the first {n} Flickr8k photos in {relative(SHARED_IMAGES)}"
    torch.manual_seed(1)
    return torch.rand(n, 3, model.config.image_size, model.config.image_size), f"{n} random tensors"


def rate(fn: Callable[[], object], items: int, min_seconds: float) -> float:
    fn()  # warm-up
    start, count = time.perf_counter(), 0
    while True:
        fn()
        count += items
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` that returns only once a GPU has finished its work (CUDA calls return before that)."""
    if device.type != "cuda":
        return fn

    def call() -> object:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def bench_decoder(model: CaptionModel, features: torch.Tensor, seconds: float) -> dict[str, object]:
    special = SpecialIds()
    beam = BeamConfig(beam_size=3, max_len=20)
    decoder = model.decoder

    def batched() -> object:
        return beam_search(decoder, features, beam, special)

    def looped() -> object:
        return [beam_search(decoder, features[i:i + 1], beam, special) for i in range(len(features))]

    with torch.inference_mode():
        batched_caps = [h.tokens for h in beam_search(decoder, features, beam, special)]
        single_caps = [beam_search(decoder, features[i:i + 1], beam, special)[0].tokens
                       for i in range(len(features))]
        batched_rate = rate(batched, len(features), seconds)
        looped_rate = rate(looped, len(features), seconds)
    return {"images": len(features), "beam": 3, "batched_images_per_s": round(batched_rate, 1),
            "one_at_a_time_images_per_s": round(looped_rate, 1), "ratio": round(batched_rate / looped_rate, 2),
            "identical_captions": batched_caps == single_caps}


def encoder_variants(model: CaptionModel, sample: torch.Tensor,
                     device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's encoder in the original layout, channels-last, and (on CPU) frozen."""
    optimised = model.encoder.eval()
    baseline = copy.deepcopy(optimised).to(memory_format=torch.contiguous_format)

    def nchw(x: torch.Tensor) -> torch.Tensor:
        return baseline.backbone.features(x.contiguous()).flatten(2).transpose(1, 2)

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "nchw (before)": nchw,
        "channels_last (captioner)": optimised,
    }
    if device.type == "cpu":
        with torch.inference_mode():
            example = sample.to(device).contiguous(memory_format=torch.channels_last)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(optimised, example)))
        variants[FROZEN] = frozen
    return variants


FROZEN = "torchscript frozen + bn folded"


def bench_encoder(model: CaptionModel, images: torch.Tensor, device: torch.device, batches: list[int],
                  seconds: float) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    for name, fn in encoder_variants(model, images[:4], device).items():
        results[name] = {}
        for batch in batches:
            x = images[:batch].to(device)
            with torch.inference_mode():
                results[name][batch] = round(rate(synchronized(partial(fn, x), device), batch, seconds), 1)
        print(f"  encoder {name:32s} " + "  ".join(f"b{b}: {v:6.1f}/s" for b, v in results[name].items()))
    return results


def freezing_gain(encoder: dict[str, dict[int, float]]) -> dict[int, float]:
    """Frozen over eager channels-last images/s at each batch size (empty off CPU: nothing is frozen)."""
    if FROZEN not in encoder:
        return {}
    eager = encoder["channels_last (captioner)"]
    return {batch: round(value / eager[batch], 2) for batch, value in encoder[FROZEN].items()}


def encoder_flops_per_image(model: CaptionModel, device: torch.device) -> int:
    """FLOPs (2 per multiply-add) of one image through the encoder at the model's input size."""
    size = model.config.image_size
    image = torch.rand(1, 3, size, size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encoder(image)
    return int(counter.get_total_flops())


def matmul_flops_per_second(device: torch.device, n: int, seconds: float) -> float:
    """A float32 n x n matmul's FLOP/s (2 n^3 FLOPs per call: n^3 multiply-adds)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return rate(synchronized(partial(torch.mm, a, b), device), 1, seconds) * 2 * n**3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default=None, help="this checkpoint instead of the bundled model")
    parser.add_argument("--images", type=int, default=32, help="images for the decoder (and the largest batch)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 32], help="encoder batch sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per timed rate")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=RESULTS / "decode.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/decode.py", *argv])
    device = torch.device(args.device)
    model, which = load_model(device, args.checkpoint)
    print(f"model: {which}; vocabulary {len(model.vocab)} words; device {device}; "
          f"torch threads {torch.get_num_threads()}")
    images, source = photos(max(args.images, *args.batches), model)
    with torch.inference_mode():
        features = torch.cat([model.encoder(c.to(device)) for c in images[: args.images].split(4)])
    decoder = bench_decoder(model, features, args.seconds)
    print(f"beam search, {args.images} images, beam 3: batched {decoder['batched_images_per_s']} img/s, one at "
          f"a time {decoder['one_at_a_time_images_per_s']} img/s, ratio {decoder['ratio']}x, "
          f"identical captions: {decoder['identical_captions']}")
    encoder = bench_encoder(model, images, device, args.batches, args.seconds)
    flops = encoder_flops_per_image(model, device)
    ceiling = matmul_flops_per_second(device, args.matmul_size, args.seconds)
    best = max(max(v.values()) for v in encoder.values())
    achieved = best * flops
    print(f"encoder {flops / 1e9:.3f} GFLOP per image (counted); matmul ceiling {ceiling / 1e9:.0f} GFLOP/s; "
          f"best encoder {best:.0f} img/s = {achieved / 1e9:.1f} GFLOP/s ({100 * achieved / ceiling:.0f}%)")
    result = {
        "context": run.context(str(device)),
        "model": which, "images": source, "image_size": model.config.image_size,
        "decoder": decoder, "encoder_images_per_s": encoder,
        "freezing_gain_frozen_over_channels_last": freezing_gain(encoder),
        "encoder_gflop_per_image": round(flops / 1e9, 4),
        "matmul_size": args.matmul_size, "matmul_gflop_per_s": round(ceiling / 1e9, 1),
        "best_encoder_gflop_per_s": round(achieved / 1e9, 1),
        "best_encoder_share_of_matmul_ceiling": round(achieved / ceiling, 3),
        "flop_convention": "FLOPs: one multiply-add counts 2 (torch.utils.flop_counter and 2 n^3 per matmul)",
    }
    write_result(args.json, result)


if __name__ == "__main__":
    main()
