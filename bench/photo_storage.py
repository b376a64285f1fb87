"""Disk taken by stored photos before and after the re-encoding the bot now does on arrival.

For each photo: the bytes a person sent (what the bot used to store) and the bytes of
``captioner.images.storable_jpeg`` (upright sRGB JPEG, longest side <= 1024 px, no metadata),
plus the time the re-encoding took. Two sets:

* ``flickr8k``: the first N photos of ``../shared/data/flickr8k/images`` as they are. These copies
  are already 224 x 224 JPEGs, so they say little about phone photos.
* ``large``: the same photos upscaled (bicubic) to a phone-like size (default 4000 x 3000, 12 MP)
  and saved as JPEG quality 92 with EXIF (camera, GPS) as a phone would: generated, not real
  phone photos, and upscaled pictures compress better than real detail does.

    python bench/photo_storage.py --photos 1000 --large-photos 200
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/photo_storage.py`
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, percentile, relative, start_run, write_result  # noqa: E402
from captioner.images import STORED_MAX_SIDE, storable_jpeg  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def phone_like(data: bytes, size: tuple[int, int]) -> bytes:
    """A Flickr8k photo upscaled to ``size`` and saved with camera and GPS EXIF, quality 92."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "BenchCam", "Model 1"
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 12.0), 3: "W", 4: (0.0, 7.0, 40.0)}
    with Image.open(io.BytesIO(data)) as image:
        big = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def measure(name: str, photos: list[bytes]) -> dict[str, Any]:
    before = after = 0
    seconds = []
    sizes = set()
    for data in photos:
        started = time.perf_counter()
        kept = storable_jpeg(data)
        seconds.append(time.perf_counter() - started)
        before += len(data)
        after += len(kept)
        with Image.open(io.BytesIO(kept)) as image:
            sizes.add(image.size)
    result = {
        "photos": len(photos), "bytes_before": before, "bytes_after": after,
        "mb_before": round(before / 1e6, 2), "mb_after": round(after / 1e6, 2),
        "after_over_before": round(after / before, 4) if before else None,
        "reencode_ms_p50": round(1000 * percentile(seconds, 50), 2),
        "reencode_ms_p95": round(1000 * percentile(seconds, 95), 2),
        "largest_stored_side": max(max(s) for s in sizes) if sizes else 0,
    }
    print(f"{name}: {len(photos)} photos {result['mb_before']} MB -> {result['mb_after']} MB "
          f"({result['after_over_before']}x), re-encode p50 {result['reencode_ms_p50']} ms "
          f"p95 {result['reencode_ms_p95']} ms")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=FLICKR, help="folder of JPEG photos")
    parser.add_argument("--photos", type=int, default=1000, help="photos taken as they are")
    parser.add_argument("--large-photos", type=int, default=200, help="photos upscaled to --large-size")
    parser.add_argument("--large-size", default="4000x3000")
    parser.add_argument("--json", type=Path, default=RESULTS / "photo_storage.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/photo_storage.py", *argv])
    files = sorted(args.images.glob("*.jpg"))[: max(args.photos, args.large_photos)]
    if not files:
        raise SystemExit(f"no .jpg photos in {args.images}")
    originals = [path.read_bytes() for path in files]
    width, height = (int(v) for v in args.large_size.split("x"))
    as_sent = measure("flickr8k", originals[: args.photos])
    large = measure(f"large {args.large_size}",
                    [phone_like(data, (width, height)) for data in originals[: args.large_photos]])
    write_result(args.json, {
        "context": run.context("cpu"),
        "source": relative(args.images), "stored_max_side": STORED_MAX_SIDE,
        "flickr8k_as_they_are": as_sent,
        "large_generated": {"size": args.large_size, "how": "Flickr8k photos upscaled bicubic, JPEG q92 with "
                            "camera and GPS EXIF (generated, not real phone photos)", **large},
    })


if __name__ == "__main__":
    main()
