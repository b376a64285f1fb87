"""Starting a caption worker process (and waiting until its model is loaded), and stopping one."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from .base import ModelLoadError
from .protocol import LoadFailed, Ready, WorkerSettings

POLL = 0.25  # seconds between checks of the stop flag in blocking waits

# What the worker keeps of the environment it inherits: where programs and temp files are, the
# locale, and the knobs of Python and the numeric libraries. Everything else (tokens, database
# passwords, the bot's settings) is dropped as the worker starts, since it parses hostile images.
WORKER_ENVIRONMENT = ("PATH", "HOME", "LANG", "TMPDIR", "TZ", "VIRTUAL_ENV")
WORKER_ENVIRONMENT_PREFIXES = ("LC_", "PYTHON", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH",
                               "PYTORCH_", "KMP_", "CUBLAS_", "CUDNN_", "LD_LIBRARY_PATH")


def clean_environment() -> list[str]:
    """Drop every variable the worker does not need (called first thing in the worker); returns
    the names dropped."""
    dropped = [name for name in os.environ
               if name not in WORKER_ENVIRONMENT and not name.startswith(WORKER_ENVIRONMENT_PREFIXES)]
    for name in dropped:
        del os.environ[name]
    return dropped


@dataclass
class WorkerHandle:
    """A started worker with its model loaded, as the parent sees it."""

    process: BaseProcess
    send: Connection
    receive: Connection
    ready: Ready
    generation: int = 0  # set by the service: which of its workers this is

    def close_pipes(self) -> None:
        self.send.close()
        self.receive.close()


def spawn_worker(settings: WorkerSettings, timeout: float, stopping: threading.Event) -> WorkerHandle:
    """Start a worker and wait until its model is loaded (blocking; raises ModelLoadError).

    Gives up when ``timeout`` seconds pass or ``stopping`` is set.
    """
    from .worker import worker_main  # the worker's module loads torch: only the child needs it

    context = multiprocessing.get_context("spawn")
    request_out, request_in = context.Pipe(duplex=False)
    result_out, result_in = context.Pipe(duplex=False)
    process = context.Process(target=worker_main, args=(settings, request_out, result_in),
                              name="caption-worker", daemon=True)
    process.start()
    request_out.close()  # the child has its own copies: the parent sees EOF when it dies
    result_in.close()
    try:
        ready = _wait_until_loaded(process, result_out, timeout, stopping)
    except BaseException:
        stop_process(process)
        request_in.close()
        result_out.close()
        raise
    return WorkerHandle(process, request_in, result_out, ready)


def _wait_until_loaded(process: BaseProcess, answers: Connection, timeout: float,
                       stopping: threading.Event) -> Ready:
    deadline = time.monotonic() + timeout
    while True:
        if stopping.is_set():
            raise ModelLoadError("the service is shutting down")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ModelLoadError(f"the worker did not load the model within {timeout:g} s")
        ready = wait([answers, process.sentinel], timeout=min(left, POLL))
        if answers in ready:
            try:
                message = answers.recv()
            except (EOFError, OSError):
                process.join(5)
                raise ModelLoadError(f"the worker exited with code {process.exitcode} while loading") from None
            if isinstance(message, LoadFailed):
                raise ModelLoadError(message.message)
            if isinstance(message, Ready):
                return message
        elif process.sentinel in ready:
            process.join(5)
            raise ModelLoadError(f"the worker exited with code {process.exitcode} while loading")


def restart_delay(previous: float, uptime: float = 0.0, start_failed: bool = False) -> float:
    """Seconds to wait before starting the next worker: a worker that dies within seconds of
    starting, or fails to start, is not restarted in a tight loop (doubling up to 30 s)."""
    if start_failed:
        return min(max(2 * previous, 1.0), 30.0)
    return min(max(2 * previous, 0.5), 30.0) if uptime < 10.0 else 0.0


def stop_process(process: BaseProcess, grace: float = 0.0) -> None:
    """Wait ``grace`` seconds for it to exit, then terminate, then kill."""
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)
