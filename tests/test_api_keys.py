"""API keys: a file of hashes (never a secret), constant-time checks, revocation seen by a running server."""

from __future__ import annotations

import hmac
import json
import stat
import threading
from pathlib import Path

import pytest

from captioner.__main__ import main
from captioner.serving import keys as keys_module
from captioner.serving.keys import ApiKeys, ApiKeysError


def test_a_created_key_verifies_and_the_file_holds_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "api_keys.json"
    keys = ApiKeys(path)
    key_id, secret = keys.create("alt-text site")
    assert secret.startswith(f"cb_{key_id}_") and len(secret) >= 50
    text = path.read_text(encoding="utf-8")
    assert secret not in text and secret.split("_", 2)[2] not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = keys.verify(secret)
    assert key is not None and (key.key_id, key.name, key.active) == (key_id, "alt-text site", True)
    assert [k.key_id for k in keys.list()] == [key_id]


@pytest.mark.parametrize("wrong", [
    "", "cb_", "Bearer x", "cb_000000000000_" + "A" * 43, "x" * 10_000, "cb_\x00\u00e9_" + "A" * 43,
])
def test_wrong_or_malformed_secrets_are_refused(tmp_path: Path, wrong: str) -> None:
    keys = ApiKeys(tmp_path / "k.json")
    keys.create("a")
    assert keys.verify(wrong) is None


def test_a_secret_with_one_character_changed_is_refused(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "k.json")
    _, secret = keys.create("a")
    changed = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert keys.verify(changed) is None
    assert keys.verify(secret) is not None


def test_a_revocation_reaches_a_running_reader_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    server_side = ApiKeys(path)  # what a running server holds
    key_id, secret = ApiKeys(path).create("bot 1")
    _, other = ApiKeys(path).create("bot 2")
    assert server_side.verify(secret) is not None
    revoked = ApiKeys(path).revoke(key_id)  # another process: the keys command
    assert revoked.revoked is not None and not revoked.active
    assert server_side.verify(secret) is None
    assert server_side.verify(other) is not None  # the other key is untouched
    assert {k.key_id: k.active for k in server_side.list()}[key_id] is False
    with pytest.raises(ApiKeysError, match="no key"):
        server_side.revoke("ffffffffffff")


def test_verification_compares_digests_in_constant_time_whatever_the_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Known id, unknown id and malformed input all hash and compare once, with hmac.compare_digest."""
    keys = ApiKeys(tmp_path / "k.json")
    _, secret = keys.create("a")
    calls: list[tuple[str, str]] = []
    original = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", recording)
    for candidate in (secret, "cb_0123456789ab_" + "A" * 43, "nonsense"):
        keys.verify(candidate)
    assert len(calls) == 3
    assert all(len(a) == len(b) == 64 for a, b in calls)


def test_a_missing_file_means_no_keys_and_a_corrupt_one_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keys = ApiKeys(path)
    assert keys.list() == [] and keys.verify("cb_0123456789ab_" + "A" * 43) is None
    _, secret = keys.create("a")
    path.write_text('{"format": 1, "keys": [{"key_id": "x"}]}', encoding="utf-8")
    with pytest.raises(ApiKeysError, match="not a valid keys file"):
        keys.verify(secret)
    path.write_text(json.dumps({"format": 99, "keys": []}), encoding="utf-8")
    with pytest.raises(ApiKeysError, match="unknown format"):
        keys.list()
    path.unlink()
    assert keys.verify(secret) is None  # deleting the file revokes everything


def test_concurrent_creates_keep_every_key(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    made: list[str] = []
    threads = [threading.Thread(target=lambda i=i: made.append(ApiKeys(path).create(f"k{i}")[1])) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = ApiKeys(path)
    assert len(keys.list()) == 6 and all(keys.verify(secret) is not None for secret in made)


def test_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ApiKeysError):
        ApiKeys(tmp_path / "k.json").create("a\nb")
    with pytest.raises(ApiKeysError):
        ApiKeys(tmp_path / "k.json").create("x" * 65)


def test_the_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "k.json")
    assert main(["keys", "create", "site", "--keys", path]) == 0
    out = capsys.readouterr().out
    secret = out.split("secret: ")[1].split()[0]
    key_id = out.split("key id: ")[1].split()[0]
    assert ApiKeys(path).verify(secret) is not None
    assert main(["keys", "list", "--keys", path, "--json"]) == 0
    listed = capsys.readouterr().out
    assert json.loads(listed)["key_id"] == key_id and secret not in listed
    assert main(["keys", "revoke", key_id, "--keys", path]) == 0
    assert ApiKeys(path).verify(secret) is None
    assert main(["keys", "revoke", "nope", "--keys", path]) == 2
