"""Which profanity library screens corrections better: better-profanity or alt-profanity-check.

Both are run on a labelled list written for this project (``bench/data/screening_captions.tsv``:
clean Flickr-style captions, some with innocent words a naive filter trips on, and abusive or
spam "corrections"). For each: precision, recall and F1 of "flag this line", and the time per
caption. The project's whole entry screen (``storage.screening.Screen``: the kept library plus the
contact rules, no operator blocklist) is measured the same way.

Run: python bench/profanity_filters.py
Writes bench/results/profanity_filters.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, relative, start_run, write_result  # noqa: E402
from storage.screening import Screen  # noqa: E402

LABELLED = ROOT / "bench" / "data" / "screening_captions.tsv"


def load_labelled(path: Path) -> list[tuple[bool, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            label, text = line.split("\t", 1)
            rows.append((label.strip() == "1", text.strip()))
    return rows


def better_profanity_flagger() -> Callable[[str], bool]:
    from better_profanity import Profanity

    flagger = Profanity()
    return lambda text: bool(flagger.contains_profanity(text))


def alt_profanity_check_flagger() -> Callable[[str], bool]:
    from profanity_check import predict

    return lambda text: bool(predict([text])[0])


def screen_flagger() -> Callable[[str], bool]:
    screen = Screen()
    return lambda text: screen.flag_reason(text) is not None


def measure(flag: Callable[[str], bool], rows: list[tuple[bool, str]]) -> dict[str, Any]:
    flag(rows[0][1])  # loads word lists / models outside the timing
    started = time.perf_counter()
    flagged = [flag(text) for _, text in rows]
    per_caption_ms = (time.perf_counter() - started) / len(rows) * 1000
    tp = sum(1 for (truth, _), got in zip(rows, flagged, strict=True) if truth and got)
    fp = sum(1 for (truth, _), got in zip(rows, flagged, strict=True) if not truth and got)
    fn = sum(1 for (truth, _), got in zip(rows, flagged, strict=True) if truth and not got)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    clean = sum(1 for truth, _ in rows if not truth)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
        "false_positive_rate": round(fp / clean, 4) if clean else 0.0,
        "true_positives": tp, "false_positives": fp, "false_negatives": fn, "ms_per_caption": round(per_caption_ms, 4),
        "false_positive_lines": [text for (truth, text), got in zip(rows, flagged, strict=True) if got and not truth],
        "missed_lines": [text for (truth, text), got in zip(rows, flagged, strict=True) if truth and not got],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=LABELLED)
    parser.add_argument("--json", type=Path, default=RESULTS / "profanity_filters.json")
    args = parser.parse_args()
    run = start_run()
    rows = load_labelled(args.data)
    results = {
        "better-profanity": measure(better_profanity_flagger(), rows),
        "alt-profanity-check": measure(alt_profanity_check_flagger(), rows),
        "storage.screening.Screen (kept library + contact rules)": measure(screen_flagger(), rows),
    }
    document = {
        "data": relative(args.data), "lines": len(rows), "abusive_or_spam": sum(1 for truth, _ in rows if truth),
        "results": results, "context": run.context("cpu"),
    }
    write_result(args.json, document)
    for name, result in results.items():
        print(f"{name:58s} P {result['precision']:.3f} R {result['recall']:.3f} F1 {result['f1']:.3f} "
              f"{result['ms_per_caption']:.3f} ms/caption")


if __name__ == "__main__":
    main()
