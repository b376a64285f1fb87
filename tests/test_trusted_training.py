"""The fine-tune's side of trusted learning: per-person caps, the K-people word rule, the salted
held-out photos with per-person shares, the strict gate, review before activation."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from captioner.vocab import Vocabulary, tokenize
from common.settings import ConfigError
from storage import ModelStatus, ModelVersionError, Storage
from storage.holdout import SALT_FILENAME, choose_held_out, is_held_out, load_or_create_salt
from train import metrics
from train.data import ImageRecord
from train.finetune import heldout_cider, promotion_status
from train.gate import HELDOUT_METRIC, corrections_metric, gate
from train.trust import CorrectionRow, WordUse, cap_per_person, qualified_new_words, split_corrections

SALT = b"\x01" * 32
VOCAB = Vocabulary.build(["a dog runs on the grass"], min_freq=1)


def rows_of(person: int, n: int, start: int = 0) -> list[CorrectionRow]:
    return [CorrectionRow(f"{person:04d}{i:060x}", Path("x.jpg"), "a dog", 1000 * person + i, person)
            for i in range(start, start + n)]


# ---------------------------------------------------------------- one person's share of a run


def test_one_persons_share_of_a_run_is_capped_and_the_rest_waits() -> None:
    rows = rows_of(1, 100) + [r for p in range(2, 32) for r in rows_of(p, 3)]  # a flooder and 30 people
    kept, left = cap_per_person(rows, share=0.1, most=20)
    per_person = Counter(r.person_id for r in kept)
    assert per_person[1] == 19  # min(10% of 190 rows, 20)
    assert all(per_person[p] == 3 for p in range(2, 32))
    assert left == 81
    assert [r.correction_id for r in kept if r.person_id == 1] == list(range(1000, 1019))  # oldest first
    kept, _ = cap_per_person(rows_of(1, 100), share=0.1, most=20)
    assert len(kept) == 10  # alone: 10% of the run


def test_a_person_gets_at_least_one() -> None:
    assert len(cap_per_person(rows_of(1, 3), share=0.1, most=20)[0]) == 1


# ---------------------------------------------------------------- new words


def uses(word: str, people: int, photos: int) -> list[WordUse]:
    return [WordUse(f"a {word} on the grass", f"p{i % people}", f"x{i % photos}") for i in range(max(people, photos))]


def test_a_new_word_needs_k_people_on_k_photos() -> None:
    found = qualified_new_words(VOCAB, [*uses("bicycle", 3, 3), *uses("slurword", 1, 100), *uses("spamcoin", 5, 2)],
                                min_people=3, most=20)
    assert found == ["bicycle"]  # one account on 100 photos, or five accounts on two photos, add nothing


def test_new_words_per_run_are_capped_most_widely_used_first() -> None:
    found = qualified_new_words(VOCAB, [*uses("kayak", 3, 3), *uses("bicycle", 6, 6), *uses("helmet", 4, 4)],
                                min_people=3, most=2)
    assert found == ["bicycle", "helmet"]


def test_vocabulary_rule_is_linear_in_the_corrections() -> None:
    """10,000 junk corrections with 10,000 distinct unknown words: one pass, not words x corrections."""
    junk = [WordUse(f"a junk{i} word{i} on grass", f"p{i % 50}", f"x{i}") for i in range(10_000)]
    started = time.perf_counter()
    assert qualified_new_words(VOCAB, junk, min_people=3, most=20) == []
    assert time.perf_counter() - started < 5.0


# ---------------------------------------------------------------- held-out photos


def test_the_salt_is_made_once_and_kept_secret(tmp_path: Path) -> None:
    salt = load_or_create_salt(tmp_path)
    assert len(salt) == 32 and load_or_create_salt(tmp_path) == salt
    assert (tmp_path / SALT_FILENAME).stat().st_mode & 0o077 == 0
    assert load_or_create_salt(tmp_path / "other") != salt


def test_processes_starting_together_get_the_same_whole_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Several bot and trainer processes may start at once on a fresh data folder (CI saw one read
    # an empty key file). The first creator is slow to produce its key; the second must neither
    # read a half-written file nor end up with a different key.
    import secrets
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from storage import keys as key_module

    first_call = threading.Event()
    real_token_hex = secrets.token_hex

    def slow_first(nbytes: int) -> str:
        if not first_call.is_set():
            first_call.set()
            time.sleep(0.3)
        return real_token_hex(nbytes)

    monkeypatch.setattr(key_module.secrets, "token_hex", slow_first)
    path = tmp_path / "key"
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(key_module.load_or_create_key, path)
        assert first_call.wait(5)
        fast = pool.submit(key_module.load_or_create_key, path)
        keys = [slow.result(), fast.result()]
    assert keys[0] == keys[1] and len(keys[0]) == 32
    assert path.stat().st_mode & 0o077 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary file left behind


def test_no_person_makes_up_more_than_their_share_of_the_held_out_photos() -> None:
    contributors = {f"{p:04d}{i:060x}": {p} for p in range(40) for i in range(5)}
    contributors |= {f"ffff{i:060x}": {999} for i in range(200)}  # one account with 200 photos
    held = choose_held_out(contributors, SALT, 0.2, 0.1)
    by_person = Counter(p for key in held for p in contributors[key])
    assert by_person[999] <= max(1, int(0.1 * sum(is_held_out(k, SALT) for k in contributors)))
    assert by_person[999] < 0.25 * len(held)
    assert all(is_held_out(k, SALT) for k in held)
    # The attacker's other "held-out" photos are trained on (under the per-person cap) instead.
    rows = [CorrectionRow(k, Path("x"), "a dog", n, next(iter(v))) for n, (k, v) in enumerate(contributors.items())]
    split = split_corrections(rows, SALT, 0.2, 0.1, run_person_share=0.1, max_per_person=20)
    assert {r.image_id.removeprefix("photo:") for r in split.heldout} == held


def test_the_salt_not_the_sender_decides() -> None:
    keys = [f"{i:064x}" for i in range(1000)]
    one, other = ({k for k in keys if is_held_out(k, salt)} for salt in (b"a" * 32, b"b" * 32))
    assert 150 < len(one) < 250 and len(one & other) < 0.5 * len(one)


# ---------------------------------------------------------------- the gate and the operator


def test_a_bootstrap_bound_of_exactly_zero_does_not_pass() -> None:
    base = {"corrections": {"CIDEr": 0.2}, "validation": {"CIDEr": 0.5}}
    better = {"corrections": {"CIDEr": 0.6}, "validation": {"CIDEr": 0.5}}
    assert not gate(base, better, 0.03, improvement_lower_bound=0.0).promote
    assert gate(base, better, 0.03, improvement_lower_bound=0.001).promote
    few = gate(base, better, 0.03, improvement_lower_bound=0.5, heldout_photos=3, min_photos=5)
    assert not few.promote and "too few held-out photos" in few.reason


def test_held_out_corrections_of_one_concept_give_its_word_weight() -> None:
    # Every held-out correction names the concept, so over those sentences alone CIDEr's IDF of
    # "bike" is 0: a candidate that learned the word earns nothing for it. With the training
    # corpus's document frequencies (which lack the word) it is the most telling word there is.
    corpus = [ImageRecord(f"train{i}", Path("t.jpg"), (f"a dog runs on the grass {i}", f"a man in a red shirt {i}"))
              for i in range(50)]
    heldout = [ImageRecord(f"held{i}", Path("h.jpg"), (f"a man rides a bike on the {place}",))
               for i, place in enumerate(["road", "hill", "track", "street", "dirt"])]
    with_word = {r.image_id: "a man rides a bike" for r in heldout}
    without = {r.image_id: "a man rides a horse" for r in heldout}
    own_stats = {name: metrics.score({r.image_id: list(r.captions) for r in heldout}, captions, ("CIDEr",),
                                     use_java=False).per_image["CIDEr"]
                 for name, captions in (("with", with_word), ("without", without))}
    assert own_stats["with"] == pytest.approx(own_stats["without"])  # blind to the learned word
    scorer = heldout_cider(corpus, heldout)
    assert scorer is not None
    ids = [f"held-out:{r.image_id}" for r in heldout]
    learned = scorer.score(ids, [tokenize(with_word[r.image_id]) for r in heldout])
    not_learned = scorer.score(ids, [tokenize(without[r.image_id]) for r in heldout])
    assert (learned > not_learned + 0.5).all()
    assert heldout_cider([], heldout) is None  # no training corpus: the gate falls back


def test_the_gate_judges_by_corpus_cider_when_it_was_computed() -> None:
    both = {"CIDEr": 0.4, HELDOUT_METRIC: 0.1, "Bleu_1": 0.5}
    assert corrections_metric(both, both) == HELDOUT_METRIC
    assert corrections_metric({"CIDEr": 0.4}, {"CIDEr": 0.5}) == "CIDEr"
    assert corrections_metric({"CIDEr": 0.0, "Bleu_1": 0.2}, {"CIDEr": 0.0, "Bleu_1": 0.3}) == "Bleu_1"
    base = {"corrections": {"CIDEr": 0.5, HELDOUT_METRIC: 0.1}, "validation": {"CIDEr": 0.5}}
    cand = {"corrections": {"CIDEr": 0.4, HELDOUT_METRIC: 0.4}, "validation": {"CIDEr": 0.5}}
    assert gate(base, cand, 0.03, 0.1).promote
    assert not gate(cand, base, 0.03, 0.1).promote
    # Certain but tiny (what fine-tuning on random captions buys): below the effect-size floor.
    tiny = gate(base, cand, 0.03, 0.007, min_gain=0.05)
    assert not tiny.promote and "need > +0.050" in tiny.reason
    assert gate(base, cand, 0.03, 0.06, min_gain=0.05).promote
    # The floor is on CIDEr-D's scale: a run judged by a fallback metric only needs a gain above 0.
    fallback_base = {"corrections": {"CIDEr": 0.2}, "validation": {"CIDEr": 0.5}}
    fallback_cand = {"corrections": {"CIDEr": 0.3}, "validation": {"CIDEr": 0.5}}
    assert gate(fallback_base, fallback_cand, 0.03, 0.007, min_gain=0.05).promote


def test_new_words_always_wait_for_review_and_review_mode_holds_everything() -> None:
    assert promotion_status(False, False, "auto") == ModelStatus.REJECTED
    assert promotion_status(True, True, "auto") == ModelStatus.AWAITING_REVIEW
    assert promotion_status(True, False, "auto") == ModelStatus.ACTIVE
    assert promotion_status(True, False, "review") == ModelStatus.AWAITING_REVIEW
    with pytest.raises(ConfigError):
        promotion_status(True, False, "yolo")


async def test_only_approval_activates_and_rejection_marks_the_run(tmp_path: Path) -> None:
    store = await Storage.open(data_dir=tmp_path / "data")
    try:
        photo = await store.record_photo(b"p", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=1)
        caption = await store.record_caption(photo.id, model_version="base", text="a dog", score=0.0, beam_size=1,
                                             latency_ms=1.0, requester_telegram_id=1)
        correction = await store.record_correction(caption.id, 1, "a cat on a mat")
        await store.register_model_version("base", "b", None, {}, status=ModelStatus.ACTIVE)
        for name in ("good", "bad"):
            await store.register_model_version(name, name, "base", {}, status=ModelStatus.AWAITING_REVIEW)
        await store.mark_corrections_trained([correction.id], "bad")
        assert (await store.active_model_version()).name == "base"  # type: ignore[union-attr]
        rejected = await store.reject_after_review("bad", "teaches an insult")
        assert rejected.status == ModelStatus.REJECTED
        assert rejected.reason == "rejected by an operator: teaches an insult"
        with pytest.raises(ModelVersionError, match="not awaiting review"):
            await store.approve_model_version("bad")
        approved = await store.approve_model_version("good")
        assert approved.status == ModelStatus.ACTIVE and (await store.active_model_version()) == approved
        with pytest.raises(ModelVersionError, match="not awaiting review"):
            await store.reject_after_review("good", "too late")
        async with store.engine.connect() as conn:
            from sqlalchemy import text

            assert (await conn.execute(text("SELECT outcome FROM corrections"))).scalar() == "rejected_run"
    finally:
        await store.close()
