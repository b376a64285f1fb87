"""What every benchmark report says about its own run, measured while it ran.

A script calls :func:`start_run` before measuring and :meth:`Run.context` when done, and writes its
result with :func:`write_result`. The context holds only facts read at run time (load average
before and after, CPU count, torch threads, device name, versions, git commit, the command line,
start time and duration) and the processes the script itself started; nothing is asserted about
the machine that the run did not observe. Paths in results are relative to the repository root,
and :func:`write_result` refuses a document that still holds an absolute path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# An absolute path inside a string: "/" plus at least two components, at the start or after a separator.
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s=:,'\"(\[])/[^\s/]+/[^\s/]+")


OUTSIDE = "<outside the checkout>"


def relative(path: str | Path) -> str:
    """``path`` relative to the repository root (``../shared/...`` for a sibling folder); of a path
    elsewhere (a scratch folder) only its name, so that no report describes the machine's folders."""
    absolute = Path(os.path.abspath(path))  # not resolve(): ../shared may be a symbolic link
    if absolute.is_relative_to(ROOT.parent):
        return os.path.relpath(absolute, ROOT)
    return f"{OUTSIDE}/{absolute.name}"


def add_split_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The options of a benchmark that decodes a dataset split from the feature cache: --data, --split,
    --limit, --cache and (unless ``device`` is False) --device, with the defaults they all share."""
    parser.add_argument("--data", default="flickr:../shared/data/flickr8k")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("--cache", default=str(ROOT / "cache" / "features"))
    if device:
        parser.add_argument("--device", default="cpu")


def relative_spec(spec: str) -> str:
    """A dataset spec (``FORMAT:PATH[@IMAGE_ROOT]``, as ``train`` takes) with its paths made :func:`relative`."""
    kind, sep, paths = spec.partition(":")
    if not sep or not paths:
        return spec
    return f"{kind}:" + "@".join(relative(path) for path in paths.split("@", 1))


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as one would type it from the repository root, without absolute paths."""
    args = list(sys.argv if argv is None else argv)
    script = relative(args[0]) if args and args[0] not in ("", "-c") else "-c"
    return shlex.join(["python", script, *(_relative_argument(a) for a in args[1:])])


def _relative_argument(argument: str) -> str:
    name, equals, value = argument.rpartition("=")
    if equals and value.startswith("/"):
        return f"{name}={relative(value)}"
    kind, colon, path = argument.partition(":")  # a dataset as FORMAT:PATH[@IMAGE_ROOT]
    if colon and kind.isalpha() and path.startswith("/"):
        return relative_spec(argument)
    return relative(argument) if argument.startswith("/") else argument


def device_name(device: str) -> str:
    """The accelerator's name for a CUDA device, else the CPU's model name as the OS reports it."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(torch.device(device)))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> dict[str, Any]:
    """The checked-out commit and whether tracked files differed from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": bool(status.strip())}


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


@dataclass
class Run:
    """One benchmark run: what was true when it started, and what it started itself."""

    command: str
    started_utc: str
    load_average_before: list[float]
    started_at: float = field(default_factory=time.perf_counter)
    started_processes: list[str] = field(default_factory=list)

    def started(self, description: str) -> None:
        """Record something this run started that shared the machine (a worker process, a server)."""
        self.started_processes.append(description)

    def context(self, device: str) -> dict[str, Any]:
        """The run's context, read now (at the end of the run) except what was read at its start."""
        import torch

        return {
            "command": self.command,
            "git": git_commit(),
            "started_utc": self.started_utc,
            "duration_seconds": round(time.perf_counter() - self.started_at, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "device_name": device_name(device),
            "load_average_before": self.load_average_before,
            "load_average_after": _load_average(),
            "started_by_this_run": list(self.started_processes),
        }


def start_run(argv: list[str] | None = None) -> Run:
    return Run(command=command_line(argv), started_utc=datetime.now(UTC).isoformat(timespec="seconds"),
               load_average_before=_load_average())


def absolute_paths(document: Any) -> list[str]:
    """Every string in a JSON-like document that contains an absolute file-system path."""
    return [text for text in _strings(document) if _ABSOLUTE_PATH.search(text)]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def write_result(path: Path, document: dict[str, Any]) -> None:
    """Write a result as indented JSON; a result must not name paths of the machine it ran on."""
    leaked = absolute_paths(document)
    if leaked:
        print(json.dumps(document, indent=1))  # the run's numbers are not lost with the refusal
        raise ValueError(f"result holds absolute paths (use bench.report.relative): {leaked[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {relative(path)}")


def metric_ratios(values: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Each metric in ``values`` as a ratio to the same metric in ``reference`` (measured in the same
    run), to 4 decimals; a metric the reference lacks or scores 0 is left out."""
    return {key: round(value / reference[key], 4) for key, value in values.items() if reference.get(key)}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p95, min and max of latencies given in seconds, in milliseconds."""
    return {"p50_ms": round(percentile(seconds, 50) * 1000, 3), "p90_ms": round(percentile(seconds, 90) * 1000, 3),
            "p95_ms": round(percentile(seconds, 95) * 1000, 3), "min_ms": round(min(seconds) * 1000, 3),
            "max_ms": round(max(seconds) * 1000, 3), "samples": len(seconds)}
