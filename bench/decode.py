"""Decoder and encoder throughput on this machine (CPU by default; --device cuda on a GPU).

1. Beam search (beam 3) over N=32 images' precomputed features: batched (one N x k tensor
   program) vs one image at a time in a loop, with a check that the captions are identical.
2. The encoder alone, images/s at batch 1, 4, 8, 32, in the original layout (NCHW) and in the
   optimised one the captioner uses (channels-last), plus TorchScript-frozen with batch-norm folded.
3. A large float32 matmul's GFLOP/s: the machine's ceiling (EfficientNet-Lite0 ~ 0.4 GFLOP/image).

Run: python bench/decode.py [--device cpu|cuda] [--json bench/results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig, SpecialIds, beam_search  # noqa: E402
from captioner.checkpoint import CaptionModel  # noqa: E402
from captioner.encoder import Encoder  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.inference import preprocess  # noqa: E402
from captioner.model import ModelConfig  # noqa: E402
from captioner.vocab import Vocabulary  # noqa: E402

SHARED_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def load_model(device: torch.device) -> tuple[CaptionModel, str]:
    try:
        return checkpoint.load(None, device), "the bundled default model"
    except checkpoint.CheckpointError:
        torch.manual_seed(0)
        vocab = Vocabulary([*Vocabulary().words, *(f"w{i}" for i in range(2530))])
        model = CaptionModel.create(ModelConfig(), vocab).to(device)
        model.decoder.eval()
        return model, "a random-weight model of the default size (no bundled model yet)"


def photos(n: int, model: CaptionModel) -> torch.Tensor:
    if SHARED_IMAGES.is_dir():
        files = sorted(SHARED_IMAGES.iterdir())[:n]
        return torch.stack([preprocess(model, load_image(f.read_bytes())) for f in files])
    torch.manual_seed(1)
    return torch.rand(n, 3, model.config.image_size, model.config.image_size)


def rate(fn: Callable[[], object], items: int, min_seconds: float = 3.0) -> float:
    fn()  # warm-up
    start, count = time.perf_counter(), 0
    while True:
        fn()
        count += items
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed


def bench_decoder(model: CaptionModel, features: torch.Tensor) -> dict[str, object]:
    special = SpecialIds()
    beam = BeamConfig(beam_size=3, max_len=20)
    decoder = model.decoder
    with torch.inference_mode():
        batched_caps = [h.tokens for h in beam_search(decoder, features, beam, special)]
        single_caps = [beam_search(decoder, features[i:i + 1], beam, special)[0].tokens
                       for i in range(len(features))]
        batched = rate(lambda: beam_search(decoder, features, beam, special), len(features))
        looped = rate(lambda: [beam_search(decoder, features[i:i + 1], beam, special)
                               for i in range(len(features))], len(features))
    return {"images": len(features), "beam": 3, "batched_images_per_s": round(batched, 1),
            "one_at_a_time_images_per_s": round(looped, 1), "ratio": round(batched / looped, 2),
            "identical_captions": batched_caps == single_caps}


def bench_encoder(images: torch.Tensor, device: torch.device) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    optimised = Encoder("efficientnet_lite0").eval().to(device)
    baseline = Encoder("efficientnet_lite0").eval().to(device).to(memory_format=torch.contiguous_format)

    def nchw(x: torch.Tensor) -> torch.Tensor:
        return baseline.backbone.features(x.contiguous()).flatten(2).transpose(1, 2)

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "nchw (before)": nchw,
        "channels_last (captioner)": optimised,
    }
    if device.type == "cpu":
        with torch.inference_mode():
            sample = images[:4].to(device).contiguous(memory_format=torch.channels_last)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(optimised, sample)))
        variants["torchscript frozen + bn folded"] = frozen
    for name, fn in variants.items():
        results[name] = {}
        for batch in (1, 4, 8, 32):
            x = images[:batch].to(device)
            with torch.inference_mode():
                results[name][batch] = round(rate(lambda fn=fn, x=x: fn(x), batch, 2.0), 1)
        print(f"  encoder {name:32s} " + "  ".join(f"b{b}: {v:6.1f}/s" for b, v in results[name].items()))
    return results


def matmul_gflops(device: torch.device) -> float:
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    per_call = 2 * n**3
    return rate(lambda: torch.mm(a, b), 1, 2.0) * per_call / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "decode.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, which = load_model(device)
    print(f"model: {which}; vocabulary {len(model.vocab)} words; device {device}; "
          f"torch threads {torch.get_num_threads()}")
    images = photos(32, model)
    with torch.inference_mode():
        features = torch.cat([model.encoder(c.to(device)) for c in images.split(4)])
    decoder = bench_decoder(model, features)
    print(f"beam search, 32 images, beam 3: batched {decoder['batched_images_per_s']} img/s, one at a time "
          f"{decoder['one_at_a_time_images_per_s']} img/s, ratio {decoder['ratio']}x, "
          f"identical captions: {decoder['identical_captions']}")
    encoder = bench_encoder(images, device)
    gflops = matmul_gflops(device)
    best = max(max(v.values()) for v in encoder.values())
    print(f"matmul ceiling: {gflops:.0f} GFLOP/s; best encoder {best:.0f} img/s = "
          f"{best * 0.4:.0f} GFLOP/s ({100 * best * 0.4 / gflops:.0f}% of the ceiling)")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/decode.py --device " + args.device,
        "machine": f"{platform.machine()} {platform.processor()} torch {torch.__version__}",
        "model": which, "decoder": decoder, "encoder_images_per_s": encoder, "matmul_gflops": round(gflops, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
