from captioner.vocab import SPECIAL_TOKENS, Vocabulary, tokenize


def test_tokenize_lowercases_keeps_digits_and_drops_punctuation() -> None:
    assert tokenize("A Dog's 2 balls, on the GRASS!") == ["a", "dogs", "2", "balls", "on", "the", "grass"]
    assert tokenize("  ...  ") == []


def test_build_applies_min_freq_and_orders_by_frequency() -> None:
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_freq=2)
    assert vocab.words == [*SPECIAL_TOKENS, "a", "dog"]
    assert vocab.encode("a cat") == [vocab.start_id, vocab.id_of("a"), vocab.unk_id, vocab.end_id]


def test_decode_stops_at_end_and_skips_specials() -> None:
    vocab = Vocabulary.build(["a dog runs"], min_freq=1)
    ids = [vocab.start_id, vocab.id_of("a"), vocab.pad_id, vocab.id_of("dog"), vocab.end_id, vocab.id_of("runs")]
    assert vocab.decode(ids) == ["a", "dog"]


def test_json_round_trip() -> None:
    vocab = Vocabulary.build(["two dogs play in the snow"], min_freq=1)
    assert Vocabulary.from_json(vocab.to_json()).words == vocab.words


def test_extend_appends_without_moving_existing_ids() -> None:
    vocab = Vocabulary.build(["a dog"], min_freq=1)
    before = {w: vocab.id_of(w) for w in vocab.words}
    added = vocab.extend(["bicycle", "dog", "bicycle", "helmet"])
    assert added == [len(before), len(before) + 1]
    assert all(vocab.id_of(w) == i for w, i in before.items())
