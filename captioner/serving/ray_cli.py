"""``python -m captioner serve``: deploy the caption application on a Ray cluster and keep it up.

Run it on the head node of a cluster (``--address auto``) or, without ``--address``, on a local
one-machine cluster it starts itself. It blocks until Ctrl-C (which removes the application) unless
``--detach`` is given, in which case the application keeps running on the cluster.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..images import ImageLimits
from .config import resolve_batching
from .ray_spec import APP_NAME, ModelChoice, RaySpec

log = logging.getLogger("captioner.serving.ray")


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high) or int(high) < 1:
        raise argparse.ArgumentTypeError("expected MIN:MAX, e.g. 1:4")
    return int(low), int(high)


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="deploy the caption service (and its HTTP API) on a Ray cluster")
    serve.add_argument("--address", default=None,
                       help="Ray cluster: auto (this machine joined one with `ray start`), HOST:6379 or "
                            "ray://HOST:10001; default: start a local cluster")
    scale = serve.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of captioner replicas")
    scale.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                       help="let Serve scale the replicas between MIN and MAX")
    serve.add_argument("--gpus-per-replica", type=float, default=None,
                       help="GPUs per replica (default: 1 if this cluster has GPUs, else 0)")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0)
    serve.add_argument("--resource", action="append", default=[], metavar="NAME=AMOUNT",
                       help="a custom Ray resource each replica needs (e.g. node2=1), repeatable")
    serve.add_argument("--model", default=None,
                       help="checkpoint folder, readable at this path on EVERY node (default: the bundled model)")
    serve.add_argument("--sha256", default=None,
                       help="sha256 of the checkpoint's model.safetensors (checked on each node)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (on each replica)")
    serve.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs)")
    serve.add_argument("--batch-size", type=int, default=None,
                       help="photos per batch (default: the device's, as the embedded worker: serving/config.py)")
    serve.add_argument("--batch-wait-ms", type=float, default=None,
                       help="how long a batch waits for more photos (default: the device's)")
    serve.add_argument("--max-ongoing", type=int, default=None, help="requests one replica holds (default: 2 batches)")
    serve.add_argument("--max-queued", type=int, default=64, help="requests each caller queues before 'busy'")
    serve.add_argument("--beam", type=int, default=None, help="default beam size (default: the model's own)")
    serve.add_argument("--max-bytes", type=int, default=ImageLimits().max_bytes)
    serve.add_argument("--max-pixels", type=int, default=ImageLimits().max_pixels)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--http-host", default="0.0.0.0")
    serve.add_argument("--keys", type=Path, default=None,
                       help="API key file: also serve the HTTP API (POST /v1/captions) on --http-port")
    serve.add_argument("--requests-per-minute", type=int, default=60, help="per API key")
    serve.add_argument("--app-name", default=APP_NAME)
    serve.add_argument("--detach", action="store_true", help="return once deployed; the cluster keeps serving")


def spec_from_args(args: argparse.Namespace, cluster_gpus: float) -> RaySpec:
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    # The same per-device batching as the embedded worker (one rule: config.DEVICE_BATCHING).
    batching = resolve_batching(args.batch_size, args.batch_wait_ms, "cuda" if gpus else "cpu")
    batch = batching.max_batch_size
    resources: dict[str, float] = {}
    for item in args.resource:
        name, sep, amount = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--resource {item!r}: expected NAME=AMOUNT")
        resources[name] = float(amount)
    low, high = args.autoscale if args.autoscale else (None, None)
    return RaySpec(
        replicas=args.replicas, autoscale_min=low, autoscale_max=high, gpus_per_replica=gpus,
        cpus_per_replica=args.cpus_per_replica, resources=resources,
        device=args.device if args.device != "auto" else ("cuda" if gpus else "cpu"), threads=args.threads,
        max_batch_size=batch, batch_wait_ms=batching.max_wait_ms, max_ongoing_requests=args.max_ongoing or 2 * batch,
        max_queued_requests=args.max_queued, default_beam_size=args.beam, max_image_bytes=args.max_bytes,
        max_image_pixels=args.max_pixels, http=args.keys is not None,
        keys_file=str(args.keys.expanduser().resolve()) if args.keys else None,
        requests_per_minute=args.requests_per_minute)


def serve_command(args: argparse.Namespace) -> int:
    from .ray_service import require_ray

    require_ray()
    import ray
    from ray import serve

    from . import ray_deploy

    ray.init(address=args.address, namespace="captionbot", include_dashboard=None if args.address else False)
    try:
        spec = spec_from_args(args, float(ray.cluster_resources().get("GPU", 0)))
        model = ModelChoice(str(Path(args.model).expanduser().resolve()) if args.model else None, args.sha256, 0)
        client = ray_deploy.serve_client(http_host=args.http_host, http_port=args.http_port)
        ray_deploy.deploy(client, spec, model, args.app_name)
        replicas = ray_deploy.wait_for_generation(client, model.generation, args.app_name)
    except (RuntimeError, TimeoutError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    versions = sorted({entry.version for entry in replicas.values()})
    print(f"serving {args.app_name}: {len(replicas)} replica(s), model {', '.join(versions)}"
          + (f", HTTP API on port {args.http_port}" if spec.http else ""), flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(args.app_name)
    return 0
