"""The Ray Serve caption service on a local Ray cluster (CPU): one cluster and one two-replica
deployment for the whole module, because Ray starts slowly. The order of the tests matters a
little: the reload test leaves the first model serving again, and killing a replica comes last."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' (CI installs it)")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -e '.[ray]'")

from captioner.images import ImageError, ImageProblem  # noqa: E402
from captioner.result import CaptionResult  # noqa: E402
from captioner.serving import ray_deploy  # noqa: E402
from captioner.serving.base import ModelLoadError, QueueFullError  # noqa: E402
from captioner.serving.config import ServiceConfig  # noqa: E402
from captioner.serving.keys import ApiKeys  # noqa: E402
from captioner.serving.process import ProcessCaptionService  # noqa: E402
from captioner.serving.ray_service import RayCaptionService, RayServiceConfig  # noqa: E402
from captioner.serving.ray_spec import ModelChoice, RaySpec  # noqa: E402
from tests.bot_support import bot_over_fake_api, truncated_jpeg  # noqa: E402
from tests.helpers import make_checkpoint, photo_bytes  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PHOTOS = [photo_bytes(seed) for seed in range(6)]
BATCH_DELAY = 0.3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    client: Any
    first: Path  # the model the deployment starts with
    second: Path
    http_port: int  # the HTTP API (the application's FastAPI ingress)
    keys: ApiKeys
    key_id: str
    secret: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Cluster]:
    second = make_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny2", version="test-v2", seed=7)
    keys = ApiKeys(tmp_path_factory.mktemp("keys") / "api_keys.json")
    key_id, secret = keys.create("tests")
    http_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="captionbot-tests")
    try:
        client = ray_deploy.serve_client(http_port=http_port)
        # Two replicas sharing the two cores; small bounds, so that backpressure is reachable; every
        # batch takes at least BATCH_DELAY, so that a replica can be killed while it holds photos.
        spec = RaySpec(replicas=2, cpus_per_replica=0.5, threads=1, device="cpu", max_batch_size=8,
                       batch_wait_ms=50, max_ongoing_requests=8, max_queued_requests=24,
                       debug_batch_delay=BATCH_DELAY, http=True, keys_file=str(keys.path))
        ray_deploy.deploy(client, spec, ModelChoice(str(tiny_checkpoint)), timeout=300)
        yield Cluster(client, tiny_checkpoint, second, http_port, keys, key_id, secret)
    finally:
        serve.shutdown()
        ray.shutdown()


async def ray_service(cluster: Cluster, **config: Any) -> RayCaptionService:
    service = RayCaptionService(RayServiceConfig(address="auto", **config))
    await service.start()
    return service


async def test_captions_equal_the_embedded_workers(cluster: Cluster) -> None:
    embedded = ProcessCaptionService(ServiceConfig(checkpoint=str(cluster.first), device="cpu", threads=1))
    await embedded.start()
    try:
        expected = await asyncio.gather(*(embedded.caption(p) for p in PHOTOS))
    finally:
        await embedded.close()
    service = await ray_service(cluster)
    got = await asyncio.gather(*(service.caption(p) for p in PHOTOS))
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=1e-4)
    assert {r.model_version for r in got} == {"test-v1"} and service.model_version == "test-v1"
    assert all(r.width == 96 and r.height == 80 and r.compute_seconds > 0 for r in got)
    with_picture = await service.caption(PHOTOS[0], attention=True, beam_size=1)
    assert with_picture.attention_png is not None and with_picture.attention_png.startswith(b"\x89PNG")
    assert with_picture.attention is None and with_picture.beam_size == 1
    await service.close()


def _post(port: int, body: bytes, secret: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "image/jpeg"} | ({"Authorization": f"Bearer {secret}"} if secret else {})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/captions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_the_http_api_on_the_same_deployment_checks_keys(cluster: Cluster) -> None:
    service = await ray_service(cluster)
    expected = await service.caption(PHOTOS[1])
    await service.close()
    status, body = await asyncio.to_thread(_post, cluster.http_port, PHOTOS[1], cluster.secret)
    assert status == 200, body
    assert body["caption"] == expected.text and body["model_version"] == "test-v1"
    status, body = await asyncio.to_thread(_post, cluster.http_port, b"not a photo", cluster.secret)
    assert status // 100 == 4
    assert body["error"]["code"] == ImageProblem.NOT_AN_IMAGE.value
    assert (await asyncio.to_thread(_post, cluster.http_port, PHOTOS[1], None))[0] == 401
    assert (await asyncio.to_thread(_post, cluster.http_port, PHOTOS[1], cluster.secret + "x"))[0] == 401
    cluster.keys.revoke(cluster.key_id)  # the ingress re-reads the file: no restart
    assert (await asyncio.to_thread(_post, cluster.http_port, PHOTOS[1], cluster.secret))[0] == 401


async def test_batches_bigger_than_one_under_concurrency(cluster: Cluster) -> None:
    service = await ray_service(cluster)
    results = await asyncio.gather(*(service.caption(PHOTOS[i % 6]) for i in range(16)))
    assert max(r.batch_size for r in results) > 1
    assert service.status().capacity > 0
    await service.close()


async def test_bad_photos_come_back_as_the_same_errors(cluster: Cluster) -> None:
    service = await ray_service(cluster)
    with pytest.raises(ImageError) as truncated:
        await service.caption(truncated_jpeg())
    assert truncated.value.code in (ImageProblem.TRUNCATED, ImageProblem.DAMAGED)
    with pytest.raises(ImageError) as text:
        await service.caption(b"definitely not a photo")
    assert text.value.code == ImageProblem.NOT_AN_IMAGE
    with pytest.raises(ValueError):
        await service.caption(PHOTOS[0], beam_size=99)
    await service.close()


async def test_backpressure_is_queue_full(cluster: Cluster) -> None:
    service = await ray_service(cluster)
    # Two replicas hold 8 each and this caller queues 24 more: 160 at once cannot all be taken.
    outcomes = await asyncio.gather(*(service.caption(PHOTOS[i % 6]) for i in range(160)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, QueueFullError)]
    answered = [o for o in outcomes if isinstance(o, CaptionResult)]
    assert refused and answered and len(refused) + len(answered) == len(outcomes), outcomes
    await service.close()


async def test_reload_switches_every_replica_and_a_bad_one_keeps_the_model(cluster: Cluster) -> None:
    service = await ray_service(cluster)
    before = set(ray_deploy.running_replicas(cluster.client))
    assert await service.reload(cluster.second) == "test-v2"
    reports = ray_deploy.board_entries()
    running = set(ray_deploy.running_replicas(cluster.client))
    assert running == before and len(running) == 2  # reconfigured in place, not replaced
    assert {reports[r].version for r in running} == {"test-v2"}
    results = await asyncio.gather(*(service.caption(PHOTOS[i % 6]) for i in range(12)))
    assert {r.model_version for r in results} == {"test-v2"}

    with pytest.raises(ModelLoadError, match="not readable"):
        await service.reload(cluster.second.parent / "missing")
    assert {r.model_version for r in await asyncio.gather(*(service.caption(p) for p in PHOTOS))} == {"test-v2"}

    assert await service.reload(cluster.first) == "test-v1"
    await service.close()


async def test_bot_answers_a_photo_over_ray(cluster: Cluster, tmp_path: Path) -> None:
    async with bot_over_fake_api(tmp_path, service="ray", ray_address="auto", model=str(cluster.first)) as (fake, bot):
        person = fake.person(4242, "Rae")
        photo = await person.photo(PHOTOS[1])
        [answer] = await fake.wait_reply(photo)
        assert answer["text"].startswith("📷"), answer["text"]
        assert type(bot.service).__name__ == "RayCaptionService"


async def test_a_replica_killed_mid_burst_loses_no_request(cluster: Cluster) -> None:
    service = await ray_service(cluster, request_timeout=120)
    burst = [asyncio.ensure_future(service.caption(PHOTOS[i % 6])) for i in range(14)]
    await asyncio.sleep(BATCH_DELAY / 2)  # both replicas are inside a batch now
    victim = ray_deploy.replica_actor_names(cluster.client)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    results = await asyncio.gather(*burst)
    assert len(results) == 14 and all(isinstance(r, CaptionResult) and r.text for r in results)
    assert service.retried > 0  # the dead replica held some of them
    await service.close()
