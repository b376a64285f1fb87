"""``python -m captioner keys ...`` and ``python -m captioner api``: API keys and the HTTP API on one machine.

FastAPI and uvicorn are imported only when ``api`` runs (they are the optional ``api`` extra),
so ``python -m captioner caption`` works on a default install.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from ..images import ImageLimits
from .keys import ApiKeys, ApiKeysError

DEFAULT_KEYS_FILE = Path("data/api_keys.json")


def add_api_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keys`` and ``api`` on the captioner's sub-command parser."""
    keys = sub.add_parser("keys", help="create, revoke or list the HTTP API's keys")
    keys.set_defaults(handler=keys_command)
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print its secret (shown only once)")
    create.add_argument("name", help="who or what the key is for (1-64 characters)")
    revoke = actions.add_parser("revoke", help="revoke a key (a running server stops accepting it at once)")
    revoke.add_argument("key_id")
    listing = actions.add_parser("list", help="list the keys (ids, names, dates; never secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    for action in (create, revoke, listing):
        action.add_argument("--keys", type=Path, default=DEFAULT_KEYS_FILE, help="the keys file (default: %(default)s)")

    api = sub.add_parser("api", help="serve the HTTP API on this machine (needs the 'api' extra)")
    api.set_defaults(handler=api_command)
    api.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s: this machine only)")
    api.add_argument("--port", type=int, default=8080)
    api.add_argument("--keys", type=Path, default=DEFAULT_KEYS_FILE, help="the keys file (default: %(default)s)")
    api.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    api.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    api.add_argument("--rate-limit", type=int, default=60, help="requests per minute per key (default: %(default)s)")
    api.add_argument("--max-bytes", type=int, default=ImageLimits().max_bytes, help="largest image accepted, in bytes")
    api.add_argument("--max-beam", type=int, default=10, help="largest beam a request may ask for")
    api.add_argument("--queue", type=int, default=64, help="photos queued at most; more are answered 503 busy")
    api.add_argument("--max-connections", type=int, default=512,
                     help="open connections at most; more are answered 503 (default: %(default)s)")


def keys_command(args: argparse.Namespace) -> int:
    keys = ApiKeys(args.keys)
    try:
        if args.action == "create":
            key_id, secret = keys.create(args.name)
            print(f"key id: {key_id}\nsecret: {secret}\n(the secret is shown only now; it is stored as a hash)")
        elif args.action == "revoke":
            key = keys.revoke(args.key_id)
            print(f"revoked {key.key_id} ({key.name}) at {key.revoked}")
        else:
            for key in keys.list():
                if args.json:
                    print(json.dumps({"key_id": key.key_id, "name": key.name, "created": key.created,
                                      "revoked": key.revoked}))
                else:
                    print(f"{key.key_id}  {'active ' if key.active else 'revoked'}  {key.created}  {key.name}")
    except ApiKeysError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def api_command(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.INFO)
    try:
        import uvicorn

        from .http import create_app
    except ImportError as err:
        print(f"error: the HTTP API needs the 'api' extra (pip install -e '.[api]'): {err}", file=sys.stderr)
        return 2
    from .config import ServiceConfig
    from .process import ProcessCaptionService

    keys = ApiKeys(args.keys)
    try:
        active = [key for key in keys.list() if key.active]
    except ApiKeysError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not active:
        print(f"error: {args.keys} has no active API key; create one with "
              f"`python -m captioner keys create NAME --keys {args.keys}`", file=sys.stderr)
        return 2
    limits = ImageLimits(max_bytes=args.max_bytes)
    service = ProcessCaptionService(ServiceConfig(checkpoint=args.model, device=args.device, image_limits=limits,
                                                  max_beam_size=args.max_beam, queue_capacity=args.queue))
    app = create_app(service, keys, requests_per_minute=args.rate_limit, image_limits=limits,
                     max_beam_size=args.max_beam)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                                           server_header=False, log_level="info"))

    async def serve() -> None:
        await service.start()  # loads the model before the port opens: no request meets a cold worker
        try:
            await server.serve()
        finally:
            await service.close()

    asyncio.run(serve())
    return 0
