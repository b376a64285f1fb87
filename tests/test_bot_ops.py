"""What operators see: /metrics and /healthz (bot/metrics.py, bot/ops.py).

The bot runs end to end over the fake Bot API with ``CAPTIONBOT_METRICS_PORT=0`` (a free port), and
the tests scrape it over real HTTP like Prometheus does. A caption service test double stands in
for the worker where the worker's behaviour is not the point (a service that is down or full).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot import texts
from bot.app import CaptionBot
from bot.metrics import BotMetrics
from bot.ops import MAX_HEAD_BYTES, HealthCheck, OpsServer
from captioner.result import CaptionResult
from captioner.serving.base import (
    CaptionService,
    ModelLoadError,
    QueueFullError,
    QueueStatus,
    ServiceError,
    WorkerCrashedError,
)
from common.settings import Settings
from tests.bot_support import TOKEN, bot_over_fake_api
from tests.fake_telegram import FakeTelegram
from tests.helpers import photo_bytes

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:.*retry_after.*"),  # PTB's AIORateLimiter reads a deprecated field
]
module_loop = pytest.mark.asyncio(loop_scope="module")

# ---------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http(port: int, path: str = "/", method: str = "GET", raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    """One request over a fresh connection (the server closes it after answering)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(raw if raw is not None else
                     f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parsed = dict(line.split(": ", 1) for line in lines)
    return Reply(int(status_line.split(" ")[1]), {k.lower(): v for k, v in parsed.items()}, body)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    reply = await http(port, "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}


async def scrape_until(port: int, name: str, expected: float, timeout: float = 10.0,
                       **labels: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until a sample reaches ``expected`` (a handler counts just after it answers)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(port)
        if value(samples, name, **labels) == expected or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.05)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def listening_ports() -> set[int]:
    """TCP ports this process listens on (Linux: /proc), to prove which ports the bot opened."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with_target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(f"/proc/self/fd/{fd}") else ""
        if with_target.startswith("socket:["):
            mine.add(with_target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in mine:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc (Linux)")


@dataclass
class DoubleService(CaptionService):
    """A caption service test double: answers from a canned result or fails with ``error``."""

    error: BaseException | None = None
    calls: int = 0
    delay: float = 0.0
    closed: bool = False
    results: list[CaptionResult] = field(default_factory=list)

    async def start(self) -> None:
        return None

    async def caption(self, image: bytes, *, beam_size: int | None = None, attention: bool = False,
                      timeout: float | None = None) -> CaptionResult:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        result = CaptionResult("a test double", ("a", "test", "double"), -0.5, -1.5, True, "double-v1", 1,
                               batch_size=3, queue_seconds=0.01, compute_seconds=0.02)
        self.results.append(result)
        return result

    def status(self) -> QueueStatus:
        return QueueStatus(2, 1, 8, 0.5)

    @property
    def model_version(self) -> str:
        return "double-v1"

    async def reload(self, checkpoint: str | Path) -> str:
        raise ModelLoadError("the test double loads nothing")

    async def close(self, drain_timeout: float = 10.0) -> None:
        self.closed = True


# ---------------------------------------------------------------------- the bot with its worker


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FakeTelegram, CaptionBot]]:
    async with bot_over_fake_api(tmp_path_factory.mktemp("ops"), metrics_port=0, queue_notice_at=0) as pair:
        yield pair


@module_loop
async def test_a_photo_a_vote_and_a_correction_show_in_the_metrics(served: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = served
    assert bot.ops is not None
    port = bot.ops.port
    before = await scrape(port)
    assert value(before, "captionbot_photos_received_total") == 0
    assert value(before, "captionbot_model_info", version="tiny-bot-v1") == 1
    assert value(before, "captionbot_queue_capacity_photos") > 0

    ada = fake.person(4101, "Ada")
    photo = await ada.photo(photo_bytes(11))
    [answer] = await fake.wait_reply(photo)
    assert answer["text"].startswith("📷")
    samples = await scrape_until(port, "captionbot_captions_sent_total", 1)
    assert value(samples, "captionbot_photos_received_total") == 1
    assert value(samples, "captionbot_captions_sent_total") == 1
    assert value(samples, "captionbot_batch_size_photos_count") == 1
    assert value(samples, "captionbot_batch_size_photos_sum") >= 1
    for histogram in ("queue_wait_seconds", "model_seconds", "end_to_end_seconds"):
        assert value(samples, f"captionbot_{histogram}_count") == 1, histogram
    # The photo's own timings add up: end to end covers the model time.
    assert value(samples, "captionbot_end_to_end_seconds_sum") >= value(samples, "captionbot_model_seconds_sum")
    assert value(samples, "captionbot_telegram_last_poll_timestamp_seconds") > 0

    await fake.wait_answer(await ada.press(answer, "👍"))
    await scrape_until(port, "captionbot_votes_total", 1, kind="up")
    text = "a small dog runs across the green grass"
    [ack] = await fake.wait_reply(await ada.text(text, reply_to=answer))
    assert "saved" in ack["text"]
    [rejected] = await fake.wait_reply(await ada.text("dog", reply_to=answer))
    assert "saved" not in rejected["text"]

    reply = await http(port, "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(reply.body.decode()) for s in f.samples}
    assert value(samples, "captionbot_votes_total", kind="up") == 1
    assert value(samples, "captionbot_votes_total", kind="down") == 0
    assert value(samples, "captionbot_corrections_total", outcome="accepted") == 1
    assert value(samples, "captionbot_corrections_total", outcome="rejected") == 1
    reasons = {dict(labels)["reason"]: n for (name, labels), n in samples.items()
               if name == "captionbot_corrections_rejected_total"}
    assert reasons == {"too_few_words": 1}
    # Nobody's id, words or the token in what anyone who can reach the port reads.
    exposition = reply.body.decode()
    for secret in ("4101", text, TOKEN, TOKEN.split(":")[1]):
        assert secret not in exposition


@module_loop
async def test_healthz_says_healthy_and_the_server_refuses_what_it_does_not_serve(
        served: tuple[FakeTelegram, CaptionBot]) -> None:
    _, bot = served
    assert bot.ops is not None
    port = bot.ops.port
    health = await http(port, "/healthz")
    assert health.status == 200 and health.headers["content-type"] == "application/json"
    report = health.json()
    assert report["healthy"] is True
    assert report["polling"]["ok"] is True and report["polling"]["running"] is True
    assert report["polling"]["seconds_since_last_poll"] < 30
    assert report["caption_service"]["ok"] is True
    assert report["caption_service"]["model_version"] == "tiny-bot-v1"
    assert (await http(port, "/health?verbose=1")).status == 200
    head = await http(port, "/healthz", method="HEAD")
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0

    openmetrics = await http(port, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.body.rstrip().endswith(b"# EOF")
    odd_accept = await http(port, "/metrics", headers={"Accept": "text/plain; version=x.y; escaping=%%"})
    assert odd_accept.status == 200

    assert (await http(port, "/nope")).status == 404
    post = await http(port, "/metrics", method="POST")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
    assert (await http(port, raw=b"\x16\x03\x01\x02\x00garbage\r\n\r\n")).status == 400  # a TLS hello
    assert (await http(port, raw=b"GET http://elsewhere/ HTTP/1.1\r\n\r\n")).status == 400
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES * 2) + b"\r\n\r\n"
    assert (await http(port, raw=huge)).status == 431
    # A client that connects and says nothing does not stop others from being served.
    _, idle = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await http(port, "/metrics")).status == 200
    finally:
        idle.close()


@needs_proc
@module_loop
async def test_the_port_is_listened_on_when_the_setting_is_on(served: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = served
    assert bot.ops is not None and bot.ops.host == "127.0.0.1"
    assert {fake.port, bot.ops.port} <= listening_ports()  # guards the check of the test below


@module_loop
async def test_healthz_503_once_the_caption_service_is_closed(served: tuple[FakeTelegram, CaptionBot]) -> None:
    """Runs last in this module: it closes the worker. A recent caption made the service look
    fine; a person's photo failing on the closed service makes the health check look again."""
    fake, bot = served
    assert bot.ops is not None and bot.service is not None
    port = bot.ops.port
    assert (await http(port, "/healthz")).json()["caption_service"]["checked_by"] in ("recent caption", "probe")
    await bot.service.close(drain_timeout=0)
    bea = fake.person(4102, "Bea")
    [answer] = await fake.wait_reply(await bea.photo(photo_bytes(12)))
    assert answer["text"] == texts.RESTARTING
    health = await http(port, "/healthz")
    assert health.status == 503
    report = health.json()
    assert report["healthy"] is False and report["polling"]["ok"] is True
    assert report["caption_service"] == report["caption_service"] | {
        "ok": False, "checked_by": "probe", "error": "ServiceClosedError"}
    samples = await scrape(port)
    assert value(samples, "captionbot_errors_total", code="service_closed") == 1
    assert value(samples, "captionbot_health_probes_total", outcome="failed") >= 1
    assert value(samples, "captionbot_photos_received_total") == 2


# ---------------------------------------------------------------------- with a service test double


@needs_proc
async def test_metrics_off_opens_no_port(tmp_path: Path) -> None:
    before = listening_ports()
    async with bot_over_fake_api(tmp_path, service_factory=lambda s, c: DoubleService()) as (fake, bot):
        assert bot.settings.metrics_port is None and bot.ops is None
        assert listening_ports() - before == {fake.port}
        # It still counts (cheaply), it just does not serve.
        [answer] = await fake.wait_reply(await fake.person(4201).photo(photo_bytes(13)))
        assert "test double" in answer["text"]


async def test_a_down_service_and_a_stopped_poll_are_503(tmp_path: Path) -> None:
    double = DoubleService(error=WorkerCrashedError("the test double is down"))
    async with bot_over_fake_api(tmp_path, service_factory=lambda s, c: double, metrics_port=0) as (fake, bot):
        assert bot.ops is not None
        port = bot.ops.port
        [answer] = await fake.wait_reply(await fake.person(4301).photo(photo_bytes(14)))
        assert answer["text"] == texts.WORKER_FAILED
        health = await http(port, "/healthz")
        assert health.status == 503
        report = health.json()
        assert report["polling"]["ok"] is True
        assert report["caption_service"]["error"] == "WorkerCrashedError"
        assert report["caption_service"]["queue_waiting"] == 2
        samples = await scrape(port)
        assert value(samples, "captionbot_errors_total", code="worker_crashed") == 1
        assert value(samples, "captionbot_captions_sent_total") == 0
        assert value(samples, "captionbot_queue_waiting_photos") == 2

        double.error = None  # the service recovers; the poll stops
        assert bot.app.updater is not None
        await bot.app.updater.stop()
        report = (await http(port, "/healthz")).json()
        assert report["caption_service"]["ok"] is True
        assert report["polling"] == report["polling"] | {"ok": False, "running": False}
        assert report["healthy"] is False


async def test_the_port_setting_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Settings(token=TOKEN, metrics_port=70000)
    with pytest.raises(ValueError):
        Settings(token=TOKEN, metrics_host="")


async def test_a_port_in_use_fails_the_start_loudly(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            async with bot_over_fake_api(tmp_path, service_factory=lambda s, c: DoubleService(),
                                         metrics_port=taken.getsockname()[1]):
                pass
    finally:
        taken.close()


# ---------------------------------------------------------------------- the health check alone


def _check(service: CaptionService, metrics: BotMetrics | None = None) -> HealthCheck:
    return HealthCheck(metrics or BotMetrics(), lambda: True, lambda: service, poll_max_quiet=60)


async def test_concurrent_checks_share_one_probe() -> None:
    double = DoubleService(delay=0.2)
    check = _check(double)
    check.metrics.poll.polling_started()
    reports = await asyncio.gather(*(check.report() for _ in range(5)))
    assert double.calls == 1
    assert all(healthy and report["caption_service"]["checked_by"] == "probe" for healthy, report in reports)
    healthy, report = await check.report()  # the probe's answer is trusted for a while
    assert healthy and report["caption_service"]["checked_by"] == "recent caption" and double.calls == 1


@pytest.mark.parametrize(("error", "ok"), [(QueueFullError("full"), True), (ServiceError("odd"), False),
                                           (ValueError("beam"), False)])
async def test_probe_outcomes(error: BaseException, ok: bool) -> None:
    check = _check(DoubleService(error=error))
    verdict = await check.service_verdict()
    assert verdict.ok is ok
    assert verdict.detail.get("busy", False) is ok


async def test_a_failure_after_the_last_answer_means_look_again() -> None:
    double = DoubleService()
    metrics = BotMetrics()
    check = _check(double, metrics)
    metrics.note_service_answered(await double.caption(b""))
    assert (await check.service_verdict()).detail["checked_by"] == "recent caption"
    metrics.note_service_failed(WorkerCrashedError("gone"))
    double.error = WorkerCrashedError("still gone")
    verdict = await check.service_verdict()
    assert not verdict.ok and verdict.detail["checked_by"] == "probe"


async def test_no_service_and_no_poll_yet_are_unhealthy() -> None:
    check = HealthCheck(BotMetrics(), lambda: False, lambda: None, poll_max_quiet=60)
    healthy, report = await check.report()
    assert not healthy and report["caption_service"] == {"ok": False, "error": "not started"}
    assert report["polling"]["seconds_since_last_poll"] is None


def test_labels_never_take_arbitrary_values() -> None:
    metrics = BotMetrics()
    metrics.note_error('x"} 1\ncaptionbot_fake 9')
    metrics.note_error("A" * 100)
    metrics.note_correction("held_for_review")
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert 'captionbot_errors_total{code="other"} 2.0' in text
    assert "captionbot_fake" not in text
    assert re.search(r'captionbot_corrections_total\{outcome="held_for_review"\} 1.0', text)


async def test_the_server_alone_serves_the_registry(tmp_path: Path) -> None:
    metrics = BotMetrics()
    server = OpsServer("127.0.0.1", 0, metrics, _check(DoubleService(), metrics))
    await server.start()
    try:
        metrics.note_photo_received()
        samples = await scrape(server.port)
        assert value(samples, "captionbot_photos_received_total") == 1
        assert value(samples, "captionbot_telegram_poll_failures_total") == 0
    finally:
        await server.close()
    with pytest.raises(RuntimeError):
        _ = server.port
