"""The embedded worker against Ray Serve with one and two replicas, and a two-node cluster.

    python bench/scale.py [--requests 48] [--callers 16] [--beam 3] [--checkpoint DIR]
                          [--out bench/results/scale.json]

In one run, the same photos, the same model, one torch thread per replica or worker:

* embedded: ProcessCaptionService (the worker process next to the bot), with one thread and with
  two (this machine's cores), so that the Ray figures are compared with the best of the two;
* ray_1 / ray_2: a local Ray cluster (``ray.init(num_cpus=2)``), the Serve application deployed
  as ``python -m captioner serve`` deploys it, with one and then two replicas, through
  RayCaptionService (what the bot uses with CAPTIONBOT_SERVICE=ray);
* two_nodes: a head node and a second node (each its own raylet with one CPU and a ``captioner``
  resource, as two ``ray start`` commands make them; here ``ray.cluster_utils.Cluster`` starts
  both on this machine so that the run stops only what it started), one replica per node, which
  the report proves from the replicas' node ids;
* identical captions: every Ray configuration's captions equal the embedded worker's.

Callers retry a busy answer as the bot's people do (bench/worker.py's Caller).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, Run, percentile, start_run, write_result  # noqa: E402
from bench.worker import Caller, load_photos, prepare_model, through_worker  # noqa: E402
from captioner.serving.base import CaptionService  # noqa: E402
from captioner.serving.config import ServiceConfig  # noqa: E402
from captioner.serving.process import ProcessCaptionService  # noqa: E402

BATCH = 8


async def measure(service: CaptionService, photos: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    caller = Caller(cast(Any, service), args.beam)
    await through_worker(caller, photos[: args.warmup], args.callers)  # first batches pay one-off costs
    caller.busy_answers = 0
    results, latencies, wall = await through_worker(caller, photos, args.callers)
    sizes = [r.batch_size for r in results]
    return {"photos_per_second": round(len(photos) / wall, 3), "wall_seconds": round(wall, 2),
            "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "latency_p95_ms": round(percentile(latencies, 95) * 1000, 1),
            "mean_batch_size": round(sum(sizes) / len(sizes), 2), "largest_batch": max(sizes),
            "busy_answers": caller.busy_answers, "_texts": [r.text for r in results]}


async def embedded(checkpoint: str | None, photos: list[bytes], args: argparse.Namespace,
                   threads: int) -> dict[str, Any]:
    service = ProcessCaptionService(ServiceConfig(checkpoint=checkpoint, device="cpu", threads=threads,
                                                  max_batch_size=BATCH))
    await service.start()
    try:
        return await measure(service, photos, args) | {"threads": threads}
    finally:
        await service.close()


async def through_ray(checkpoint: str | None, photos: list[bytes], args: argparse.Namespace, replicas: int,
                      cpus: float, resources: dict[str, float]) -> dict[str, Any]:
    from captioner.serving import ray_deploy
    from captioner.serving.ray_service import RayCaptionService, RayServiceConfig
    from captioner.serving.ray_spec import ModelChoice, RaySpec

    client = ray_deploy.serve_client(http_port=0)
    spec = RaySpec(replicas=replicas, cpus_per_replica=cpus, threads=1, device="cpu", resources=resources,
                   max_batch_size=BATCH, max_ongoing_requests=2 * BATCH, max_queued_requests=64)
    ray_deploy.deploy(client, spec, ModelChoice(checkpoint))
    ray_deploy.wait_for_generation(client, 0)
    service = RayCaptionService(RayServiceConfig(address="auto"))
    await service.start()
    try:
        result = await measure(service, photos, args)
    finally:
        await service.close()
    details = client.get_serve_details()["applications"][ray_deploy.APP_NAME]["deployments"]["Captioner"]
    nodes = sorted({r["node_id"] for r in details["replicas"] if r.get("state") == "RUNNING"})
    return result | {"replicas": replicas, "cpus_per_replica": cpus, "replica_nodes": len(nodes)}


async def local_cluster(checkpoint: str | None, photos: list[bytes], args: argparse.Namespace,
                        run: Run) -> dict[str, dict[str, Any]]:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="captionbot-bench")
    run.started("a local Ray cluster (ray.init, 2 CPUs) with Serve")
    try:
        one = await through_ray(checkpoint, photos, args, 1, 1.0, {})
        two = await through_ray(checkpoint, photos, args, 2, 1.0, {})
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"ray_1_replica": one, "ray_2_replicas": two}


async def two_nodes(checkpoint: str | None, photos: list[bytes], args: argparse.Namespace,
                    run: Run) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"captioner": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"captioner": 1, "node2": 1})
    run.started("a two-node Ray cluster on this machine (head + second raylet, 1 CPU each) with Serve")
    try:
        ray.init(address=cluster.address, log_to_driver=False, namespace="captionbot-bench")
        cluster.wait_for_nodes()
        # One "captioner" unit per node: Serve must place one replica on each node.
        return await through_ray(checkpoint, photos, args, 2, 0.5, {"captioner": 1})
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def identical(reference: list[str], other: dict[str, Any]) -> dict[str, Any]:
    texts = other.pop("_texts")
    other["identical_captions"] = texts == reference
    other["caption_mismatches"] = sum(a != b for a, b in zip(texts, reference, strict=True))
    return other


async def bench(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    photos, photo_note = load_photos(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, model_note = prepare_model(Path(scratch), args.checkpoint)
        print("embedded worker, 1 and 2 threads ...", flush=True)
        embedded_1 = await embedded(checkpoint, photos, args, 1)
        embedded_2 = await embedded(checkpoint, photos, args, 2)
        print("Ray, 1 and 2 replicas ...", flush=True)
        ray_runs = await local_cluster(checkpoint, photos, args, run)
        print("two nodes ...", flush=True)
        nodes = await two_nodes(checkpoint, photos, args, run)
    reference = embedded_1["_texts"]
    runs = {"embedded_1_thread": embedded_1, "embedded_2_threads": embedded_2, **ray_runs, "two_nodes": nodes}
    for name, result in runs.items():
        identical(reference, result)
        print(f"{name:20s} {result['photos_per_second']:7.2f} photos/s  p50 {result['latency_p50_ms']:7.1f} ms  "
              f"batch {result['mean_batch_size']:5.2f}  identical {result['identical_captions']}")
    best = max(embedded_1["photos_per_second"], embedded_2["photos_per_second"])
    ratios = {name: round(runs[name]["photos_per_second"] / best, 3)
              for name in ("ray_1_replica", "ray_2_replicas", "two_nodes")}
    print(f"ratios against the best embedded worker ({best:.2f} photos/s): {ratios}")
    return {
        "context": run.context("cpu"), "model": model_note, "photos": photo_note,
        "requests": len(photos), "callers": args.callers, "beam_size": args.beam, "max_batch_size": BATCH,
        "runs": runs,
        "baseline": "the faster of embedded_1_thread and embedded_2_threads, measured in this run",
        "ratios_to_best_embedded": ratios,
        "target_ray_2_replicas_at_least": 0.9,
        "target_met": ratios["ray_2_replicas"] >= 0.9,
        "identical_captions": all(r["identical_captions"] for r in runs.values()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint instead of the bundled model")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/scale.py", *argv])
    write_result(args.out, asyncio.run(bench(args, run)))


if __name__ == "__main__":
    main()
