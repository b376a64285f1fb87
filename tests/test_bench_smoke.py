"""The benchmarks run end to end at a tiny size and write reports that state their own run.

Each script runs as documented (``python bench/<script>.py``) on the tests' tiny model into a
temporary results folder; the report must carry the run's context (measured at run time) and no
absolute path of this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.report import ROOT, absolute_paths, command_line, relative, relative_spec
from captioner.serving.config import DEVICE_BATCHING
from common.settings import Settings
from tests.bot_support import fast_checkpoint
from tests.helpers import photo_bytes

CONTEXT_FIELDS = {
    "command", "git", "started_utc", "duration_seconds", "python", "torch", "platform", "cpus",
    "torch_threads", "device", "device_name", "load_average_before", "load_average_after",
    "started_by_this_run",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fast_checkpoint(tmp_path_factory.mktemp("bench-model") / "tiny")


def run_bench(script: str, out: Path, *args: str) -> dict[str, Any]:
    """Run ``python bench/<script>`` from the repository root; its JSON report."""
    completed = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True,
                               text=True, timeout=280)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def assert_reports_its_run(document: dict[str, Any], script: str, tmp_path: Path) -> dict[str, Any]:
    context: dict[str, Any] = document["context"]
    assert set(context) >= CONTEXT_FIELDS, CONTEXT_FIELDS - set(context)
    assert context["command"].startswith(f"python bench/{script} ")
    assert len(context["load_average_before"]) == len(context["load_average_after"]) == 3
    assert context["duration_seconds"] > 0 and context["cpus"] >= 1 and context["torch_threads"] >= 1
    assert context["device_name"]
    text = json.dumps(document)
    for machine_path in (str(ROOT), str(tmp_path), str(Path.home())):
        assert machine_path not in text
    assert absolute_paths(document) == []
    assert "shared the CPU" not in text and "under nice" not in text  # no fixed sentences about the machine
    return context


@pytest.mark.slow
def test_worker_bench_counts_busy_answers_and_compares_like_with_like(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "worker.json"
    # A queue of 2 and 6 callers: the service must answer busy, and the benchmark must carry on.
    document = run_bench("worker.py", out, "--device", "cpu", "--photos", "8", "--callers", "1,6",
                         "--queue-capacity", "2", "--single", "2", "--warmup", "2", "--sweep", "2",
                         "--sweep-callers", "3", "--checkpoint", str(tiny_model), "--out", str(out))
    context = assert_reports_its_run(document, "worker.py", tmp_path)
    assert any("caption worker process" in p for p in context["started_by_this_run"])
    alone, crowd = document["levels"]
    assert (alone["callers"], alone["requests"], crowd["callers"], crowd["requests"]) == (1, 8, 6, 12)
    assert alone["busy_answers"] == 0 and crowd["busy_answers"] > 0
    assert all(level["ratio_vs_one_at_a_time"] > 0 for level in document["levels"])
    assert document["identical_captions"] is True and document["caption_mismatches"] == 0
    assert document["worker"]["max_batch_size"] == DEVICE_BATCHING["cpu"].max_batch_size  # the CPU's default
    assert document["worker"]["decode_threads"] >= 1
    assert document["batch_size_sweep"]["rows"][0]["max_batch_size"] == 2
    assert isinstance(document["baseline"]["encoder_frozen"], bool)
    assert document["freezing_at_batch_1"]["ratio_frozen_over_eager"] > 0


def test_precision_bench_compares_float32_with_itself_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "flickr"
    (data / "images").mkdir(parents=True)
    names = [f"p{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        (data / "images" / name).write_bytes(photo_bytes(60 + i))
    (data / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a photo of thing {i}\n"
                                                                   for i, n in enumerate(names)))
    (data / "val.txt").write_text("\n".join(names))
    out = tmp_path / "precision.json"
    document = run_bench("precision.py", out, "--model", str(tiny_model), "--data", f"flickr:{data}",
                         "--precision", "float32", "--device", "cpu", "--batch-size", "2", "--out", str(out))
    assert_reports_its_run(document, "precision.py", tmp_path)
    assert (document["photos"], document["identical_captions"], document["identical_share"]) == (3, 3, 1.0)
    assert document["difference"] == {"CIDEr": 0.0} and document["changed_examples"] == []
    refused = subprocess.run([sys.executable, "bench/precision.py", "--model", str(tiny_model), "--data",
                              f"flickr:{data}", "--precision", "bfloat16", "--device", "cpu", "--out",
                              str(tmp_path / "no.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "needs a CUDA device" in refused.stderr


def test_storage_bench_measures_a_bare_insert_baseline(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    document = run_bench("storage_throughput.py", out, "--rows", "20", "--tasks", "2", "--out", str(out))
    assert_reports_its_run(document, "storage_throughput.py", tmp_path)
    for side in ("storage", "bare_insert"):
        assert document[side]["sequential_rows_per_second"] > 0
        assert document[side]["concurrent_rows_per_second"] > 0
        assert document[side]["sequential_latency"]["samples"] == 20
    assert document["slowdown_sequential"] > 0


@pytest.mark.slow
def test_bot_latency_bench_measures_the_direct_caption_baseline(tmp_path: Path) -> None:
    out = tmp_path / "bot.json"
    document = run_bench("bot_latency.py", out, "--tiny", "--photos", "2", "--warmup", "1", "--size", "160x120",
                         "--out", str(out))
    context = assert_reports_its_run(document, "bot_latency.py", tmp_path)
    assert any("fake Bot API" in p for p in context["started_by_this_run"])
    assert document["through_bot"]["samples"] == document["caption_service_directly"]["samples"] == 2
    assert document["overhead_ratio_p50"] > 0
    assert document["example_caption"]


def test_http_api_bench_compares_http_with_the_service_it_serves(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    document = run_bench("http_api.py", out, "--tiny", "--photos", "2", "--warmup", "1", "--requests", "6",
                         "--callers", "3", "--size", "160x120", "--out", str(out))
    context = assert_reports_its_run(document, "http_api.py", tmp_path)
    assert any("uvicorn" in p for p in context["started_by_this_run"])
    single, burst = document["single_request"], document["burst"]
    assert single["through_http"]["samples"] == single["caption_service_directly"]["samples"] == 2
    assert single["overhead_ratio_p50"] > 0 and burst["ratio_http_over_direct"] > 0
    assert single["identical_captions"] == "2/2" and burst["identical_captions"] == "6/6"


@pytest.mark.slow
def test_decode_bench_counts_encoder_flops(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    document = run_bench("decode.py", out, "--checkpoint", str(tiny_model), "--images", "2", "--batches", "1",
                         "--seconds", "0.01", "--matmul-size", "32", "--json", str(out))
    assert_reports_its_run(document, "decode.py", tmp_path)
    assert document["decoder"]["identical_captions"] is True
    assert document["encoder_gflop_per_image"] > 0 and document["matmul_gflop_per_s"] > 0
    assert "1" in document["freezing_gain_frozen_over_channels_last"]


@pytest.mark.slow
def test_train_cache_bench_runs_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "train_cache.json"
    document = run_bench("train_cache.py", out, "--tiny", "--images", "3", "--cached-epochs", "1",
                         "--json", str(out))
    assert_reports_its_run(document, "train_cache.py", tmp_path)
    assert document["train"]["images"] == 3 and document["epoch_seconds"]["raw"] > 0
    tuned = document["fine_tuning"]
    assert tuned["blocks"] == 2 and tuned["epoch_seconds"]["cache"] > 0 and tuned["epoch_seconds"]["raw"] > 0


def test_report_paths_are_relative_to_the_repository() -> None:
    assert relative(ROOT / "bench" / "results") == "bench/results"
    assert relative(ROOT.parent / "shared" / "x") == "../shared/x"
    assert relative("/elsewhere/scratch/out.json") == "<outside the checkout>/out.json"
    command = command_line([str(ROOT / "bench" / "worker.py"), "--out", str(ROOT / "r.json"),
                            f"--checkpoint={ROOT / 'm'}", "--requests", "8"])
    assert command == "python bench/worker.py --out r.json --checkpoint=m --requests 8"
    dataset = command_line([str(ROOT / "bench" / "ensemble.py"), "--data",
                            f"karpathy:{ROOT / 'd.json'}@{ROOT / 'img'}"])
    assert dataset == "python bench/ensemble.py --data karpathy:d.json@img"


def test_a_dataset_spec_in_a_report_names_its_paths_from_the_repository() -> None:
    assert relative_spec(f"flickr:{ROOT.parent / 'shared' / 'data'}") == "flickr:../shared/data"
    assert relative_spec(f"karpathy:{ROOT / 'd.json'}@{ROOT.parent / 'images'}") == "karpathy:d.json@../images"
    assert relative_spec("coco:/elsewhere/annotations") == "coco:<outside the checkout>/annotations"
    assert relative_spec("not a spec") == "not a spec"


def test_absolute_paths_are_found_anywhere_in_a_report() -> None:
    assert absolute_paths({"a": ["photos from /work/shared/images"], "b": {"/srv/x/y": 1}}) == [
        "photos from /work/shared/images", "/srv/x/y"]
    assert absolute_paths({"a": "../shared/data/flickr8k/images", "b": "1/2 of ms/photo", "c": 3}) == []


def test_photo_storage_bench_measures_bytes_before_and_after_reencoding(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        (images / f"{seed}.jpg").write_bytes(photo_bytes(seed, size=(300, 200)))
    out = tmp_path / "storage.json"
    document = run_bench("photo_storage.py", out, "--images", str(images), "--photos", "3", "--large-photos", "2",
                         "--large-size", "1600x1200", "--json", str(out))
    assert_reports_its_run(document, "photo_storage.py", tmp_path)
    large = document["large_generated"]
    assert large["photos"] == 2 and large["largest_stored_side"] == 1024
    assert large["bytes_after"] < large["bytes_before"]
    assert document["flickr8k_as_they_are"]["photos"] == 3


def test_bot_burst_bench_reports_time_to_first_reply_with_default_limits(tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    document = run_bench("bot_burst.py", out, "--tiny", "--people", "2", "--per-person", "2", "--threads", "1",
                         "--out", str(out))
    assert_reports_its_run(document, "bot_burst.py", tmp_path)
    assert document["photos"] == 4 and document["first_reply_ms"]["samples"] == 4
    # Each photo's first answer is its caption, or the queue notice that later turns into it
    # (which of the two depends on timing); never "busy", "slow down" or an error.
    kinds = document["first_reply_kinds"]
    assert sum(kinds.values()) == 4 and set(kinds) <= {"caption", "queue notice"} and kinds.get("caption"), kinds
    assert document["settings"]["photos_per_minute"] == Settings().photos_per_minute


@pytest.mark.slow
def test_confidence_bench_calibrates_and_tries_the_out_of_domain_set(tiny_model: Path, tmp_path: Path) -> None:
    from tests.test_train_support import make_flickr

    data = make_flickr(tmp_path / "data", n_train=4, n_val=5)
    out = tmp_path / "confidence.json"
    document = run_bench("confidence.py", out, "--model", str(tiny_model), "--data", f"flickr:{data}",
                         "--cache", str(tmp_path / "cache"), "--json", str(out))
    assert_reports_its_run(document, "confidence.py", tmp_path)
    assert document["n_val"] == 5 and document["score_vs_cider"]["n_low"] == 1
    assert len(document["out_of_domain"]) >= 4  # the drawings at least; package photos when installed
    assert 0.0 <= document["val_hedge_rate"] <= 1.0 and "familiar" in document["rule"]


def test_forget_audit_bench_lists_what_forget_leaves_behind(tmp_path: Path) -> None:
    out = tmp_path / "forget.json"
    document = run_bench("forget_audit.py", out, "--out", str(out))
    assert_reports_its_run(document, "forget_audit.py", tmp_path)
    summary = document["summary"]
    assert summary["tables_with_traces_before"] >= 8 and summary["files_with_traces_before"] >= 3
    assert summary["tables_with_traces_after"] == summary["files_with_traces_after"] == 0
    assert document["what_stays"]["forgotten_people"] == [{"hash_hex_digits": 64, "flags": 1}]


def test_ensemble_bench_scores_members_students_and_the_ensemble(tmp_path: Path) -> None:
    from tests.helpers import make_checkpoint
    from tests.test_train_support import make_flickr

    data = f"flickr:{make_flickr(tmp_path / 'data', n_train=2, n_val=3)}"
    first, second = (make_checkpoint(tmp_path / f"m{seed}", seed=seed, version=f"m{seed}") for seed in (0, 1))
    out = tmp_path / "ensemble.json"
    document = run_bench("ensemble.py", out, "--model", str(first), "--member", str(second), "--student",
                         str(second), "--ensemble-beams", "1,2", "--data", data, "--cache", str(tmp_path / "cache"),
                         "--json", str(out))
    assert_reports_its_run(document, "ensemble.py", tmp_path)
    rows = document["results"]
    assert [(r["kind"], r["models"], r["decoding"]["beam_size"]) for r in rows] == [
        ("member", ["m0"], 3), ("member", ["m1"], 3), ("student", ["m1"], 3),
        ("ensemble", ["m0", "m1"], 1), ("ensemble", ["m0", "m1"], 2)]
    assert rows[0]["ratio_to_first_member"]["Bleu_1"] == 1.0
    assert rows[0]["decoder_parameters"] > 0
    assert rows[3]["decoder_parameters"] == rows[0]["decoder_parameters"] + rows[1]["decoder_parameters"]
    assert all(r["n_images"] == 3 for r in rows)


@pytest.mark.slow
def test_decoding_bench_scores_every_setting_against_the_shipped_one(tiny_model: Path, tmp_path: Path) -> None:
    from bench.decoding import SETTINGS
    from tests.test_train_support import make_flickr

    data = f"flickr:{make_flickr(tmp_path / 'data', n_train=2, n_val=2)}"
    out = tmp_path / "decoding.json"
    document = run_bench("decoding.py", out, "--model", str(tiny_model), "--data", data, "--cache",
                         str(tmp_path / "cache"), "--json", str(out))
    assert_reports_its_run(document, "decoding.py", tmp_path)
    rows = document["results"]
    shipped = [r for r in rows if r["shipped"]]
    assert len(rows) in (len(SETTINGS), len(SETTINGS) + 1) and len(shipped) == 1
    assert shipped[0]["decoding"] == document["shipped_decoding"]
    assert all(value == 1.0 for value in shipped[0]["ratio_to_shipped"].values())
    assert all(r["n_images"] == 2 for r in rows)
