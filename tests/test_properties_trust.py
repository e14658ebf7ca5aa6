"""The trust store and provenance (flash_export.artifacts.trust): a digest is trusted exactly when
it was recorded, never because it shares a prefix, a suffix or all but one digit with a recorded
one; anything that is not a lower-case hex SHA-256 is neither recorded nor trusted; provenance takes
the user's stated hash first, then the store, then --trust, and refuses the rest."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from _strategies import DIGESTS, HEX
from hypothesis import example, given
from hypothesis import strategies as st

from flash_export.artifacts.trust import (
    TRUST_STORE_ENV,
    Provenance,
    is_trusted,
    provenance,
    record_trusted,
    require_provenance,
    trust_store,
)
from flash_export.core.errors import ArtifactError, FlashExportError


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """An empty trust store of this test's own."""
    folder = tmp_path / "store"
    monkeypatch.setenv(TRUST_STORE_ENV, str(folder))
    return folder


def _near_misses(digest: str, position: int) -> list[str]:
    """Digests equal to `digest` but at `position` (prefix kept), and the same with the
    differing digit moved to the end (a 63-digit prefix kept) and to the front (a suffix)."""
    other = HEX[(HEX.index(digest[position]) + 1) % 16]
    return [digest[:position] + other + digest[position + 1:],
            digest[:63] + HEX[(HEX.index(digest[63]) + 1) % 16],
            HEX[(HEX.index(digest[0]) + 1) % 16] + digest[1:]]


def test_a_digest_sharing_16_leading_digits_with_a_trusted_one_stays_untrusted(store):
    trusted = hashlib.sha256(b"exported here").hexdigest()
    record_trusted(trusted, store / "model.onnx")
    assert is_trusted(trusted)
    for keep in (16, 32, 63):
        near = trusted[:keep] + ("0" if trusted[keep] != "0" else "1") + trusted[keep + 1:]
        assert not is_trusted(near), f"trusted a digest sharing only {keep} leading digits"


@given(digest=DIGESTS, position=st.integers(0, 63))
@example(digest="0" * 64, position=16).via("a glob on the first 16 digits")
def test_only_the_recorded_digest_is_trusted_not_its_near_misses(tmp_path_factory, digest,
                                                                 position):
    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRUST_STORE_ENV, str(folder))
        assert not is_trusted(digest)
        record_trusted(digest, folder / "m.onnx")
        assert is_trusted(digest)
        for near in _near_misses(digest, position):
            assert not is_trusted(near), near


@given(text=st.one_of(
    st.text(alphabet=HEX, max_size=70).filter(lambda t: len(t) != 64),
    st.text(alphabet=HEX + "ABCDEFxg*?/.[] \n", min_size=64, max_size=64).filter(
        lambda t: any(c not in HEX for c in t)),
    st.sampled_from(["*" * 64, "?" * 64, "../" + "a" * 61, "a" * 63 + "*", "A" * 64])))
@example(text="X" * 64)
def test_anything_but_a_lower_case_hex_sha256_is_never_recorded_or_trusted(tmp_path_factory,
                                                                           text):
    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRUST_STORE_ENV, str(folder))
        record_trusted("a" * 64, folder / "m.onnx")  # a store that is not empty
        (folder / f"{text.replace('/', '_')}.json").write_text("{}")  # even a file by its name
        with pytest.raises(ValueError, match="not a hex SHA-256"):
            record_trusted(text, folder / "m.onnx")
        assert not is_trusted(text)


def test_the_store_records_what_was_exported_where_and_keeps_the_first_record(store, tmp_path):
    digest = "ab" * 32
    record_trusted(digest, tmp_path / "first.onnx")
    entry = store / f"{digest}.json"
    first = json.loads(entry.read_text())
    assert first["sha256"] == digest
    assert first["path"] == str((tmp_path / "first.onnx").resolve())
    assert set(first) == {"sha256", "path", "exported_at", "flash_export_version"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", first["exported_at"])
    record_trusted(digest, tmp_path / "second.onnx")
    assert json.loads(entry.read_text()) == first
    assert [p.name for p in store.iterdir()] == [entry.name]
    assert store.stat().st_mode & 0o077 == 0  # the store is the user's alone


def test_the_store_is_the_variable_else_xdg_data_home_else_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(TRUST_STORE_ENV, str(tmp_path / "own"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert trust_store() == tmp_path / "own"
    monkeypatch.setenv(TRUST_STORE_ENV, "")
    assert trust_store() == tmp_path / "xdg" / "flash-export" / "trusted"
    monkeypatch.delenv(TRUST_STORE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_store = tmp_path / "home" / ".local" / "share" / "flash-export" / "trusted"
    for xdg in ("", "relative/xdg", None):  # a relative XDG_DATA_HOME is ignored
        if xdg is None:
            monkeypatch.delenv("XDG_DATA_HOME")
        else:
            monkeypatch.setenv("XDG_DATA_HOME", xdg)
        assert trust_store() == home_store
    monkeypatch.setenv(TRUST_STORE_ENV, "~/own")
    assert trust_store() == tmp_path / "home" / "own"


def test_a_relative_store_or_home_folder_is_refused_saying_what_to_set(monkeypatch):
    monkeypatch.setenv(TRUST_STORE_ENV, "rel/store")
    with pytest.raises(FlashExportError, match=rf"^{TRUST_STORE_ENV} must be an absolute path, "
                                               r"got 'rel/store': a relative store would depend "
                                               r"on the folder you run in$"):
        trust_store()
    monkeypatch.delenv(TRUST_STORE_ENV)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", "rel-home")
    with pytest.raises(FlashExportError, match=r"^no absolute home folder for the trust store "
                                               rf"\(HOME is 'rel-home'\): set {TRUST_STORE_ENV} "
                                               r"to an absolute path$"):
        trust_store()


def test_a_store_below_folders_that_do_not_exist_yet_is_made_the_users_alone(monkeypatch,
                                                                              tmp_path):
    store = tmp_path / "a" / "b" / "store"
    monkeypatch.setenv(TRUST_STORE_ENV, str(store))
    record_trusted("cd" * 32, tmp_path / "m.onnx")
    assert is_trusted("cd" * 32) and store.stat().st_mode & 0o077 == 0


@pytest.fixture
def artifact(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "model.pt"
    path.write_bytes(b"a program")
    return path, hashlib.sha256(b"a program").hexdigest()


@pytest.mark.parametrize("stated", ["exact", "upper", "spaced"])
def test_the_hash_the_user_states_is_the_evidence_when_it_matches(store, artifact, stated):
    path, digest = artifact
    text = {"exact": digest, "upper": digest.upper(), "spaced": f"  {digest}\n"}[stated]
    found = provenance(path, expect_sha256=text)
    assert found == Provenance(digest, "expected sha256") and found.verified


@pytest.mark.parametrize("stated, words", [
    ("0" * 64, "is not the file you expect"),
    ("abc", "must be 64 hex digits"),
    ("g" * 64, "must be 64 hex digits"),
])
def test_a_stated_hash_that_differs_or_is_not_one_is_refused_even_when_trusted(store, artifact,
                                                                              stated, words):
    path, digest = artifact
    record_trusted(digest, path)
    with pytest.raises(ArtifactError, match=words):
        provenance(path, expect_sha256=stated, trust=True)


def test_provenance_is_the_store_then_the_users_word_then_unverified(store, artifact):
    path, digest = artifact
    assert provenance(path) == Provenance(digest, "unverified")
    assert not provenance(path).verified
    assert provenance(path, trust=True) == Provenance(digest, "--trust")
    assert provenance(path, trust=True).verified
    record_trusted(digest, path)
    assert provenance(path) == Provenance(digest, "trust store")
    assert provenance(path, trust=True) == Provenance(digest, "trust store")


def test_provenance_uses_the_digest_the_caller_hashed(store, artifact):
    path, digest = artifact
    record_trusted("cd" * 32, path)
    assert provenance(path, digest="cd" * 32) == Provenance("cd" * 32, "trust store")
    assert provenance(path / "missing", digest="cd" * 32).source == "trust store"


def test_provenance_of_a_missing_file_is_an_artifact_error(store, tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found"):
        provenance(tmp_path / "nothing.pt")


def test_require_provenance_refuses_an_unknown_origin_saying_what_to_pass(store, artifact):
    path, digest = artifact
    with pytest.raises(ArtifactError) as caught:
        require_provenance(path, why="it runs code")
    message = str(caught.value)
    assert f"sha256 {digest[:16]}..." in message and str(store) in message
    assert message.endswith("and it runs code: pass --expect-sha256 with the hash its publisher "
                            "gave you, or --trust to load it anyway")
    assert "\n" not in message
    assert require_provenance(path, trust=True).source == "--trust"
    assert require_provenance(path, expect_sha256=digest).source == "expected sha256"


def test_require_provenance_takes_the_digest_the_caller_hashed_and_says_why_by_default(store,
                                                                                       tmp_path):
    digest = "ef" * 32
    record_trusted(digest, tmp_path / "model.pt")
    found = require_provenance(tmp_path / "gone.pt", digest=digest)
    assert found == Provenance(digest, "trust store")
    with pytest.raises(ArtifactError, match=r"and a \.pt file is a program: pass"):
        require_provenance(tmp_path / "gone.pt", digest="01" * 32)
