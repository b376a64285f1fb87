"""bench/poisoning.py runs end to end at a tiny size (the tests' tiny model, a few real Flickr8k photos)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.learning_loop import FLICKR8K
from tests.test_bench_smoke import assert_reports_its_run, run_bench, tiny_model  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not (FLICKR8K / "captions.txt").is_file(), reason="needs ../shared/data/flickr8k")


@pytest.mark.slow
@pytest.mark.shared_data
def test_poisoning_bench_flags_the_troll_and_activates_nothing_unreviewed(
        tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "poisoning.json"
    document = run_bench("poisoning.py", out, "--base", str(tiny_model), "--concept-base", str(tiny_model),
                         "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"), "--photos", "24",
                         "--honest-people", "6", "--ft-epochs", "1", "--out", str(out))
    assert_reports_its_run(document, "poisoning.py", tmp_path)
    troll, word, honest = (document["results"][k] for k in ("troll", "word", "honest"))
    # One account: 20 corrections stored, all flagged; the rest refused by the daily cap; nothing to learn.
    assert troll["corrections"] == {"flagged": 20, "daily_limit": 4}
    assert troll["finetune"].startswith("error: no new corrections") and troll["active_after_finetune"] is None
    # Five accounts: never activated without review.
    assert word["corrections"] == {"accepted": 24}
    assert word["finetune"] in ("awaiting_review", "rejected") and word["active_after_finetune"] != "poison-word"
    assert honest["accounts"] == 6 and honest["finetune"] in ("awaiting_review", "rejected")
