import hashlib
import threading
from pathlib import Path

import pytest

from idds_fat.cache import ContentStore, DirectoryStore, content_key
from idds_fat.errors import IntegrityError


def test_put_returns_sha256_and_get_returns_the_bytes(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    key = store.put(b"hello")
    assert key == hashlib.sha256(b"hello").hexdigest() == content_key(b"hello")
    assert store.get(key) == b"hello"
    assert store.exists(key)
    assert isinstance(store, ContentStore)


def test_objects_live_under_two_hex_digit_fanout(tmp_path: Path) -> None:
    key = DirectoryStore(tmp_path).put(b"data")
    assert (tmp_path / key[:2] / key).read_bytes() == b"data"


def test_location_is_file_url_of_resolved_root(tmp_path: Path) -> None:
    assert DirectoryStore(tmp_path).location == tmp_path.resolve().as_uri()
    assert DirectoryStore(tmp_path).location.startswith("file://")


def test_exists_is_false_for_missing_key(tmp_path: Path) -> None:
    assert not DirectoryStore(tmp_path).exists("0" * 64)


def test_get_of_missing_key_raises_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        DirectoryStore(tmp_path).get("a" * 64)


def test_put_skips_write_when_key_exists(tmp_path: Path, monkeypatch) -> None:
    store = DirectoryStore(tmp_path)
    key = store.put(b"once")
    writes = []
    monkeypatch.setattr(store, "_write", lambda k, d: writes.append(k))
    assert store.put(b"once") == key
    assert writes == []


def test_tampered_file_raises_integrity_error_naming_path(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    key = store.put(b"original")
    path = tmp_path / key[:2] / key
    path.write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match=str(path)):
        store.get(key)


def test_invalid_key_raises_value_error(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    with pytest.raises(ValueError):
        store.exists("ABC")


def test_concurrent_puts_of_same_key_leave_one_complete_file(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    data = b"x" * (1 << 20)
    key = content_key(data)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def put() -> None:
        barrier.wait()
        try:
            # _write directly: every thread really writes, as racing processes would.
            store._write(key, data)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert store.get(key) == data
    assert [p.name for p in (tmp_path / key[:2]).iterdir()] == [key]  # no temp files left


def test_put_many_stores_each_object_as_put_does_private_and_complete(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    items = [f"spec {i}".encode() for i in range(20)] + [b"spec 3"]  # one twice
    keys = store.put_many(items)
    assert keys == [content_key(data) for data in items]
    for key, data in zip(keys, items, strict=True):
        path = tmp_path / key[:2] / key
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporary file left


def test_put_many_writes_past_a_stale_temporary_file(tmp_path: Path) -> None:
    import os
    import threading

    store = DirectoryStore(tmp_path)
    key = content_key(b"after a kill")
    (tmp_path / key[:2]).mkdir()
    # What a killed writer with this process's pid and thread would have left.
    (tmp_path / key[:2] / f".{key[:8]}-{os.getpid()}-{threading.get_ident()}.tmp").write_bytes(b"x")
    assert store.put_many([b"after a kill"]) == [key]
    assert store.get(key) == b"after a kill"
