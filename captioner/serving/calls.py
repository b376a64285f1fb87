"""The parent's record of calls waiting for the worker, and answering them from any thread."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from ..result import CaptionResult
from .protocol import Reload, Request

# A request that was with this many workers when they died fails instead of being retried.
MAX_ATTEMPTS = 2


@dataclass
class PendingRequest:
    request: Request
    future: asyncio.Future[CaptionResult]
    loop: asyncio.AbstractEventLoop
    attempts: int = 0  # workers that died while holding this request
    sent_to: int | None = None  # generation of the worker it was sent to
    running: bool = False  # in the batch being computed


@dataclass
class PendingReload:
    message: Reload
    future: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop
    sent_to: int | None = None


def resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any = None,
            error: BaseException | None = None) -> None:
    """Thread-safe: settle ``future`` on its own loop (ignored if the loop is gone)."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_deliver, future, value, error)


def _deliver(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def fail_all(calls: list[PendingRequest] | list[PendingReload], error: type[Exception], message: str) -> None:
    """Fail each call with its own ``error(message)`` (an exception object is raised in one place)."""
    for call in calls:
        resolve(call.loop, call.future, error=error(message))


def take_from_dead_worker(pending: dict[int, PendingRequest],
                          generation: int) -> tuple[list[PendingRequest], list[PendingRequest]]:
    """The requests a dead worker held, as (to retry, to fail); the failed ones leave ``pending``."""
    retry: list[PendingRequest] = []
    failed: list[PendingRequest] = []
    for call in list(pending.values()):
        if call.sent_to != generation:
            continue  # not sent yet: the writer still has it
        call.sent_to = None
        call.running = False
        call.attempts += 1
        if call.attempts >= MAX_ATTEMPTS:
            del pending[call.request.id]
            failed.append(call)
        else:
            retry.append(call)
    return retry, failed


def mark_sent(message: object, generation: int, pending: dict[int, PendingRequest],
              reloads: dict[int, PendingReload]) -> bool:
    """Record which worker got the message; False if nobody waits for it any more."""
    if isinstance(message, Request):
        call = pending.get(message.id)
        if call is None or call.request is not message:
            return False
        call.sent_to = generation
    elif isinstance(message, Reload):
        reload = reloads.get(message.id)
        if reload is None:
            return False
        reload.sent_to = generation
    return True
