"""SecretBox: secret environments sealed at rest, key rotation, key files made private and race-free."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from cloudmodal.server.secretbox import (
    KEY_ENV,
    KEY_FILE_ENV,
    SEALED,
    SecretBox,
    SecretKeyError,
    is_sealed,
    load_or_create_key_file,
)

SECRET = "hunter2-\u00e9-distinctive-value"


def box(*keys: str) -> SecretBox:
    return SecretBox(list(keys))


def test_round_trip_hides_the_value() -> None:
    b = box(Fernet.generate_key().decode())
    env = {"API_KEY": SECRET, "MODE": "prod"}
    stored = b.seal_env(env)
    assert is_sealed(stored) and SecretBox.is_sealed(stored)
    assert list(stored) == [SEALED]
    assert SECRET not in repr(stored) and "API_KEY" not in repr(stored)  # names are sealed too
    assert b.open_env(stored) == env
    assert b.seal_env({}) == {} and b.open_env({}) == {} and b.open_env(None) == {}
    # Legacy rows hold a plaintext environment: it still opens, and reseal seals it.
    assert not is_sealed(env)
    assert b.open_env(env) == env
    assert is_sealed(b.reseal(env)) and b.open_env(b.reseal(env)) == env


def test_two_seals_of_one_value_differ() -> None:
    b = box(Fernet.generate_key().decode())
    assert b.seal_env({"A": SECRET}) != b.seal_env({"A": SECRET})  # a fresh IV each time


def test_rotation_first_key_encrypts_all_decrypt() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stored_old = box(old).seal_env({"A": SECRET})
    rotated = box(new, old)
    assert rotated.open_env(stored_old) == {"A": SECRET}
    resealed = rotated.reseal(stored_old)
    assert box(new).open_env(resealed) == {"A": SECRET}  # sealed with the new key alone
    with pytest.raises(SecretKeyError):
        box(old).open_env(resealed)


def test_wrong_key_names_the_fix() -> None:
    stored = box(Fernet.generate_key().decode()).seal_env({"A": SECRET})
    with pytest.raises(SecretKeyError) as info:
        box(Fernet.generate_key().decode()).open_env(stored)
    msg = str(info.value)
    assert KEY_ENV in msg and "share the key" in msg
    assert SECRET not in msg


def test_malformed_keys_and_stored_forms() -> None:
    with pytest.raises(SecretKeyError, match="not a valid Fernet key"):
        SecretBox(["not-a-key"])
    with pytest.raises(SecretKeyError, match="No secret key"):
        SecretBox([])
    b = box(Fernet.generate_key().decode())
    with pytest.raises(SecretKeyError, match="beside other keys"):
        b.open_env({SEALED: b.seal(b"{}"), "X": "y"})
    with pytest.raises(SecretKeyError, match="malformed"):
        b.open_env({SEALED: b.seal(b"[1, 2]")})
    with pytest.raises(SecretKeyError, match="another key"):
        b.open_env({SEALED: "garbage"})


def test_fingerprint_is_keyed() -> None:
    k1, k2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    data = b'{"inline_env": {"A": "' + SECRET.encode() + b'"}}'
    assert box(k1).fingerprint(data) == box(k1, k2).fingerprint(data)  # the encrypting key decides
    assert box(k1).fingerprint(data) != box(k2).fingerprint(data)
    assert box(k1).fingerprint(data) != box(k1).fingerprint(data + b" ")
    import hashlib

    assert box(k1).fingerprint(data) != hashlib.sha256(data).hexdigest()


def test_key_from_environment_wins_and_rotates(tmp_path: Path) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stored = SecretBox.for_state_dir(tmp_path, {KEY_ENV: old}).seal_env({"A": SECRET})
    b = SecretBox.for_state_dir(tmp_path, {KEY_ENV: f" {new} , {old} "})
    assert b.open_env(stored) == {"A": SECRET}
    assert not (tmp_path / "secret.key").exists()  # no file made when the environment has the key
    with pytest.raises(SecretKeyError, match=KEY_ENV):
        SecretBox.for_state_dir(tmp_path, {KEY_ENV: "short"})


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    b1 = SecretBox.for_state_dir(state, {})
    path = state / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) & 0o077 == 0
    stored = b1.seal_env({"A": SECRET})
    assert SecretBox.for_state_dir(state, {}).open_env(stored) == {"A": SECRET}
    assert [p.name for p in state.iterdir()] == ["secret.key"]  # no temporary file left behind
    # A key file named by the environment, with two keys (rotation through the file).
    other = tmp_path / "shared.key"
    new = Fernet.generate_key().decode()
    other.write_text(f"{new}\n{path.read_text().strip()}\n")
    os.chmod(other, 0o644)
    b2 = SecretBox.for_state_dir(tmp_path / "elsewhere", {KEY_FILE_ENV: str(other)})
    assert b2.open_env(stored) == {"A": SECRET}
    assert stat.S_IMODE(other.stat().st_mode) == 0o600  # tightened on use
    with pytest.raises(SecretKeyError):
        SecretBox([new]).open_env(stored)


def test_empty_key_file_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_text("")
    os.chmod(path, 0o600)
    with pytest.raises(SecretKeyError, match="empty"):
        load_or_create_key_file(path, wait_s=0.05)


def test_reader_waits_for_a_key_file_being_written(tmp_path: Path) -> None:
    # Where hard links are unavailable the file is made O_EXCL and written after: a racing reader waits.
    path = tmp_path / "secret.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    key = Fernet.generate_key().decode()
    reader_done = threading.Event()
    got: list[list[str]] = []

    def read() -> None:
        got.append(load_or_create_key_file(path, wait_s=30))
        reader_done.set()

    t = threading.Thread(target=read)
    t.start()
    assert not reader_done.wait(0.2)  # nothing to read yet: it must wait, not invent a key
    os.write(fd, key.encode() + b"\n")
    os.close(fd)
    t.join(30)
    assert got == [[key]]


def _race(path: str, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:  # type: ignore[name-defined]
    barrier.wait()
    out.put(load_or_create_key_file(Path(path))[0])


def test_concurrent_creation_ends_with_one_key(tmp_path: Path) -> None:
    for attempt in range(5):
        path = tmp_path / f"k{attempt}" / "secret.key"
        ctx = mp.get_context("fork")
        n = 6
        barrier = ctx.Barrier(n)
        out = ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(path), barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        keys = [out.get(timeout=60) for _ in range(n)]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert len(set(keys)) == 1, keys
        assert path.read_text().strip() == keys[0]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["secret.key"]


def test_creation_that_loses_the_race_keeps_the_winners_key(tmp_path: Path) -> None:
    # The interleaving the processes above rarely hit on their own: another process creates the file
    # between this one's existence check and its creation. The file must keep the winner's key.
    from cloudmodal.server import secretbox

    path = tmp_path / "secret.key"
    winner = Fernet.generate_key().decode()
    path.write_text(winner + "\n")
    os.chmod(path, 0o600)
    secretbox._create_key_file(path)
    assert path.read_text().strip() == winner
    assert load_or_create_key_file(path) == [winner]
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]
