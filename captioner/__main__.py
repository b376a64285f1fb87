"""``python -m captioner caption PHOTO [PHOTO ...]``: caption photos from the command line.

``python -m captioner serve``: deploy the caption service on a Ray cluster (``serving/ray_cli.py``).
``keys`` and ``api`` (the HTTP API) are in :mod:`captioner.serving.commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .attention_viz import render_attention
from .beam import BeamConfig
from .checkpoint import CheckpointError
from .images import ImageError, ImageLimits, load_image
from .inference import Captioner
from .serving.commands import add_api_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captioner", description="Caption photos.")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="print a one-sentence caption for each photo")
    cap.add_argument("photos", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, GIF, ...)")
    cap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    cap.add_argument("--beam", type=int, default=None, help="beam size (default: the model's own; 1 = greedy)")
    cap.add_argument("--max-len", type=int, default=None, help="maximum caption length in words")
    cap.add_argument("--json", action="store_true", help="one JSON object per line")
    cap.add_argument("--attention", type=Path, default=None,
                     help="write the attention picture here (with several photos: OUT-1.png, OUT-2.png, ...)")
    cap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cap.add_argument("--max-bytes", type=int, default=ImageLimits().max_bytes, help="largest file accepted")
    from .serving.ray_cli import add_serve_parser  # argparse only: Ray is imported when it runs

    add_serve_parser(sub)
    add_api_commands(sub)
    return parser


def _attention_path(base: Path, index: int, total: int) -> Path:
    return base if total == 1 else base.with_name(f"{base.stem}-{index + 1}{base.suffix or '.png'}")


def caption_command(args: argparse.Namespace) -> int:
    try:
        captioner = Captioner.load(args.model, args.device)
    except (CheckpointError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = captioner.beam
    beam = BeamConfig(args.beam or base.beam_size, args.max_len or base.max_len, base.length_penalty,
                      base.block_ngram, base.forbid_unk)
    limits = ImageLimits(max_bytes=args.max_bytes)
    failures = 0
    for index, path in enumerate(args.photos):
        try:
            image = load_image(path.read_bytes(), limits)
        except (OSError, ImageError) as err:
            failures += 1
            _report_error(args.json, path, err)
            continue
        result = captioner.caption_images([image], beam, attention=args.attention is not None)[0]
        if args.json:
            print(json.dumps({"image": str(path), "caption": result.text, "score": round(result.score, 4),
                              "confident": result.confident, "seen": [list(guess) for guess in result.seen]}))
        else:
            print(f"{path}: {result.text}")
        if args.attention is not None and result.attention is not None:
            out = _attention_path(args.attention, index, len(args.photos))
            out.write_bytes(render_attention(image, result.words, result.attention))
        sys.stdout.flush()
    return 1 if failures else 0


def _report_error(as_json: bool, path: Path, err: Exception) -> None:
    message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if as_json:
        print(json.dumps({"image": str(path), "error": message}))
    else:
        print(f"{path}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from .serving.ray_cli import serve_command

        return serve_command(args)
    handler = getattr(args, "handler", caption_command)
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
