"""``python -m train review | approve VERSION | reject VERSION --reason TEXT``: the operator's say.

A fine-tuned candidate that passed the gate but adds words (or any passing candidate in
``CAPTIONBOT_PROMOTION=review`` mode) waits as ``awaiting_review``; only approval activates it.
The bot offers the same decision to its admins in Telegram.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from common.settings import ConfigError, load_settings
from storage import ModelStatus, ModelVersionError, ModelVersionRecord, NotFound, Storage

EXIT_OK, EXIT_ERROR = 0, 1


async def _open() -> Storage:
    settings = load_settings()
    return await Storage.open(settings.database_url, settings.data_dir)


async def waiting_candidates(store: Storage) -> list[ModelVersionRecord]:
    return [v for v in await store.list_model_versions() if v.status == ModelStatus.AWAITING_REVIEW]


def describe(version: ModelVersionRecord) -> str:
    """One waiting candidate for a shell: name, parent, new words and the gate's figures."""
    metrics: dict[str, Any] = version.metrics
    lines = [f"{version.name} (from {version.parent}, {version.created_at:%Y-%m-%d %H:%M} UTC)"]
    lines.append(f"  new words: {', '.join(metrics.get('new_words', [])) or 'none'}")
    for part in ("corrections", "validation"):
        base, cand = metrics.get("base", {}).get(part) or {}, metrics.get("candidate", {}).get(part) or {}
        # Held-out corrections: the metric the gate judged by (older runs recorded none: CIDEr).
        key = metrics.get("gate_metric", "CIDEr") if part == "corrections" else "CIDEr"
        if key in base and key in cand:
            lines.append(f"  {part:12s} {key} {base[key]:.3f} -> {cand[key]:.3f}")
    if metrics.get("reason"):
        lines.append(f"  gate: {metrics['reason']}")
    return "\n".join(lines)


async def _review(args: argparse.Namespace) -> int:
    async with await _open() as store:
        waiting = await waiting_candidates(store)
    if args.json:
        print(json.dumps([{"name": v.name, "parent": v.parent, "metrics": v.metrics} for v in waiting], default=str))
    elif not waiting:
        print("no candidates waiting for review")
    for version in [] if args.json else waiting:
        print(describe(version))
        print(f"  python -m train approve {version.name}   |   python -m train reject {version.name} --reason ...")
    return EXIT_OK


async def _approve(args: argparse.Namespace) -> int:
    async with await _open() as store:
        version = await store.approve_model_version(args.version)
    print(f"APPROVED {version.name}: it is now the active model ({Path(version.checkpoint_path).name})")
    return EXIT_OK


async def _reject(args: argparse.Namespace) -> int:
    async with await _open() as store:
        version = await store.reject_after_review(args.version, args.reason)
    print(f"REJECTED {version.name}: {version.reason}")
    return EXIT_OK


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(asyncio.run(handler(args)))
        except (ConfigError, ModelVersionError, NotFound) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_ERROR

    return run


def add_parsers(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    review = sub.add_parser("review", help="list the fine-tuned candidates waiting for an operator",
                            description=__doc__, formatter_class=formatter)
    review.add_argument("--json", action="store_true", help="one JSON list instead of text")
    review.set_defaults(func=_run(_review))
    approve = sub.add_parser("approve", help="activate a candidate waiting for review", formatter_class=formatter)
    approve.add_argument("version", help="the candidate's version name (see `python -m train review`)")
    approve.set_defaults(func=_run(_approve))
    reject = sub.add_parser("reject", help="reject a candidate waiting for review", formatter_class=formatter)
    reject.add_argument("version", help="the candidate's version name")
    reject.add_argument("--reason", required=True, help="why (kept with the version)")
    reject.set_defaults(func=_run(_reject))
