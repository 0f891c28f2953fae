import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses

from idds_fat.cache import HttpStore, content_key
from idds_fat.cache.http import is_transient
from idds_fat.errors import CacheError, IntegrityError
from idds_fat.service import EmbeddedService

TOKEN = "s3cret-token"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path / "service", token=TOKEN) as running:
        yield running


@pytest.fixture
def store(service: EmbeddedService) -> Iterator[HttpStore]:
    http_store = HttpStore(service.url + "/cache", token=TOKEN)
    yield http_store
    http_store.close()


def _sent(store: HttpStore) -> list[str]:
    """Record the method of every request the store sends from now on."""
    methods: list[str] = []
    store._session.hooks["response"].append(lambda r, *a, **k: methods.append(r.request.method))
    return methods


def test_put_then_get_returns_the_bytes(store: HttpStore, service: EmbeddedService) -> None:
    key = store.put(b"payload")
    assert key == content_key(b"payload")
    assert store.exists(key)
    assert store.get(key) == b"payload"
    assert (service.data_dir / "cache" / key[:2] / key).read_bytes() == b"payload"


def test_location_is_base_url(service: EmbeddedService) -> None:
    assert HttpStore(service.url + "/cache").location == service.url + "/cache"


def test_exists_is_false_for_missing_key(store: HttpStore) -> None:
    assert not store.exists("0" * 64)


def test_put_skips_upload_when_key_exists(store: HttpStore) -> None:
    store.put(b"only once")
    sent = _sent(store)
    store.put(b"only once")
    assert sent == ["HEAD"]


def test_get_of_missing_key_raises_key_error(store: HttpStore) -> None:
    with pytest.raises(KeyError):
        store.get("b" * 64)


def test_tampered_object_raises_integrity_error(store: HttpStore, service: EmbeddedService) -> None:
    key = store.put(b"genuine")
    (service.data_dir / "cache" / key[:2] / key).write_bytes(b"forged!")
    with pytest.raises(IntegrityError, match=key):
        store.get(key)


def test_wrong_token_raises_cache_error_with_status_and_no_token(
    service: EmbeddedService,
) -> None:
    store = HttpStore(service.url + "/cache", token="wrong-token")
    sent = _sent(store)
    with pytest.raises(CacheError, match="401") as caught:
        store.put(b"x")
    assert "wrong-token" not in str(caught.value)
    assert service.url in str(caught.value)
    assert sent == ["HEAD"]  # 401 is permanent: no retry


def test_missing_token_raises_cache_error_401(service: EmbeddedService) -> None:
    with pytest.raises(CacheError, match="401"):
        HttpStore(service.url + "/cache").get("c" * 64)


def test_unreachable_service_raises_cache_error_after_attempts(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path, token=None) as stopped:
        url = stopped.url + "/cache"
    store = HttpStore(url, attempts=2)
    store._backoff_seconds = 0.01
    with pytest.raises(CacheError, match="2 attempts"):
        store.exists("d" * 64)


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(response=response)


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("refused"),
        requests.Timeout("slow"),
        _http_error(500),
        _http_error(503),
        _http_error(429),
    ],
)
def test_retry_policy_treats_connection_errors_5xx_and_429_as_transient(exc) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_retry_policy_treats_client_errors_as_permanent(status: int) -> None:
    assert not is_transient(_http_error(status))
    assert not is_transient(ValueError("not a request failure"))


@responses.activate
def test_transient_503_is_retried_until_success() -> None:
    # The one place `responses` is used: a real server cannot be made to fail on cue.
    key = content_key(b"ok")
    url = "http://cache.invalid/cache/" + key
    responses.add(responses.GET, url, status=503)
    responses.add(responses.GET, url, status=503)
    responses.add(responses.GET, url, body=b"ok", status=200)
    store = HttpStore("http://cache.invalid/cache", attempts=5)
    store._backoff_seconds = 0.001
    assert store.get(key) == b"ok"
    assert len(responses.calls) == 3


@responses.activate
def test_permanent_400_is_not_retried() -> None:
    key = content_key(b"bad")
    responses.add(responses.PUT, "http://cache.invalid/cache/" + key, status=400, body="nope")
    responses.add(responses.HEAD, "http://cache.invalid/cache/" + key, status=404)
    store = HttpStore("http://cache.invalid/cache", attempts=5)
    with pytest.raises(CacheError, match="400"):
        store.put(b"bad")
    assert [call.request.method for call in responses.calls] == ["HEAD", "PUT"]


@responses.activate
def test_503_until_attempts_exhausted_raises_cache_error_with_status() -> None:
    key = content_key(b"z")
    responses.add(responses.HEAD, "http://cache.invalid/cache/" + key, status=503)
    store = HttpStore("http://cache.invalid/cache", attempts=3)
    store._backoff_seconds = 0.001
    with pytest.raises(CacheError, match="503"):
        store.exists(key)
    assert len(responses.calls) == 3


def test_the_service_keeps_cache_objects_0600_and_reads_need_the_token(tmp_path: Path) -> None:
    # Issue 17, item 5: whatever the umask, other users cannot read the objects on disk.
    old = os.umask(0o000)
    try:
        with EmbeddedService(tmp_path / "data", token=TOKEN) as service:
            store = HttpStore(service.url + "/cache", token=TOKEN)
            key = store.put(b"pickled arguments")
            anonymous = requests.get(f"{service.url}/cache/{key}", timeout=10)
            store.close()
    finally:
        os.umask(old)
    assert anonymous.status_code == 401
    stored = tmp_path / "data" / "cache" / key[:2] / key
    assert stored.read_bytes() == b"pickled arguments"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    for directory in (stored.parent, stored.parent.parent, tmp_path / "data"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "results.sqlite3").stat().st_mode) == 0o600
