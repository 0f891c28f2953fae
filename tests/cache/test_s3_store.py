"""S3Store against a real moto S3 server on 127.0.0.1 (the ``s3_server`` fixture)."""

from __future__ import annotations

import datetime
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import botocore.auth
import pytest

from idds_fat.cache import content_key
from idds_fat.cache.s3 import MAX_URL_LIFETIME, S3Store, presigned_url_expiry
from idds_fat.errors import CacheError, IntegrityError
from idds_fat.testing import S3Server, S3ServerError

MiB = 1024 * 1024
SECRET = "do-not-show-this-secret"


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def raw(s3_server: S3Server) -> Iterator[Any]:
    """A plain boto3 client on the same server, to look behind the store's back."""
    client = s3_server.client()
    yield client
    client.close()


@pytest.fixture
def store(s3_server: S3Server, bucket: str) -> Iterator[S3Store]:
    s3_store = S3Store(
        f"s3://{bucket}/cache", endpoint_url=s3_server.endpoint_url, client=s3_server.client()
    )
    yield s3_store
    s3_store.client.close()


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configure boto3 through the environment only, with none of the user's ~/.aws."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def _calls(client: Any) -> list[str]:
    """Record the name of every S3 operation ``client`` performs from now on."""
    names: list[str] = []
    client.meta.events.register("before-call.s3", lambda model, **_: names.append(model.name))
    return names


def _sends(client: Any) -> list[str]:
    """Record the method of every HTTP request ``client`` sends (retries included)."""
    methods: list[str] = []
    client.meta.events.register(
        "before-send.s3", lambda request, **_: methods.append(request.method)
    )
    return methods


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_put_then_get_returns_the_bytes(store: S3Store, raw: Any, bucket: str) -> None:
    key = store.put(b"payload")
    assert key == content_key(b"payload")
    assert store.exists(key)
    assert store.get(key) == b"payload"
    stored = raw.get_object(Bucket=bucket, Key=f"cache/{key[:2]}/{key}")
    assert stored["Body"].read() == b"payload"


def test_location_is_the_normalised_s3_url(s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    assert S3Store(f"s3://{bucket}/a/b/", client=client).location == f"s3://{bucket}/a/b"
    assert S3Store(f"s3://{bucket}", client=client).location == f"s3://{bucket}"
    client.close()


def test_store_without_prefix_keeps_objects_at_bucket_root(
    s3_server: S3Server, bucket: str, raw: Any
) -> None:
    store = S3Store(f"s3://{bucket}", client=s3_server.client())
    key = store.put(b"at the root")
    assert raw.head_object(Bucket=bucket, Key=f"{key[:2]}/{key}")["ContentLength"] == 11


def test_exists_is_false_for_missing_key(store: S3Store) -> None:
    assert not store.exists("0" * 64)


def test_second_put_of_same_bytes_sends_only_a_head(store: S3Store) -> None:
    store.put(b"only once")
    calls = _calls(store.client)
    store.put(b"only once")
    assert calls == ["HeadObject"]


def test_small_object_is_one_put_object(store: S3Store) -> None:
    calls = _calls(store.client)
    store.put(b"small")
    assert calls == ["HeadObject", "PutObject"]


def test_object_above_threshold_is_uploaded_in_parts(
    s3_server: S3Server, bucket: str, raw: Any
) -> None:
    store = S3Store(f"s3://{bucket}/big", client=s3_server.client(), multipart_threshold=5 * MiB)
    data = os.urandom(12 * MiB)
    calls = _calls(store.client)
    key = store.put(data)
    assert calls[:2] == ["HeadObject", "CreateMultipartUpload"]
    assert calls.count("UploadPart") == 3  # 5 + 5 + 2 MiB
    assert calls[-1] == "CompleteMultipartUpload"
    assert "PutObject" not in calls
    # S3 marks multipart objects with an ETag ending in -<number of parts>.
    etag = raw.head_object(Bucket=bucket, Key=f"big/{key[:2]}/{key}")["ETag"]
    assert etag.strip('"').endswith("-3")
    assert store.get(key) == data


def test_presigned_get_url_serves_the_bytes_without_credentials(store: S3Store) -> None:
    key = store.put(b"for a node without boto3")
    url = store.presigned_get(key)
    assert url.startswith(store.client.meta.endpoint_url)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"for a node without boto3"


def test_presigned_put_url_stores_a_named_object_for_get_named(store: S3Store) -> None:
    url = store.presigned_put("results/job-7.envelope")
    # Say octet-stream: urllib's default form type makes moto's server eat the body.
    request = urllib.request.Request(
        url,
        data=b"result bytes",
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert store.get_named("results/job-7.envelope") == b"result bytes"
    store.delete_named("results/job-7.envelope")
    with pytest.raises(KeyError):
        store.get_named("results/job-7.envelope")


def test_named_objects_live_apart_from_content_keys(store: S3Store, raw: Any, bucket: str) -> None:
    key = content_key(b"named")
    store.put_named(f"{key[:2]}/{key}", b"named")
    assert not store.exists(key)
    assert raw.head_object(Bucket=bucket, Key=f"cache/named/{key[:2]}/{key}")


def test_presigned_urls_carry_the_store_lifetime(s3_server: S3Server, bucket: str) -> None:
    store = S3Store(f"s3://{bucket}/p", client=s3_server.client(), url_lifetime=3600)
    url = store.presigned_get("a" * 64)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Expires"] == ["3600"]
    now = datetime.datetime.now(datetime.timezone.utc)
    expiry = presigned_url_expiry(url)
    assert now + datetime.timedelta(seconds=3590) < expiry <= now + datetime.timedelta(hours=1)


def test_presigned_url_signed_eight_days_ago_is_expired(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sign with a frozen clock instead of waiting: SigV4 stamps the URL with the
    # signing time (X-Amz-Date) and S3 refuses it after X-Amz-Expires seconds.
    signed_at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=8)
    monkeypatch.setattr(
        botocore.auth, "get_current_datetime", lambda *a, **k: signed_at.replace(tzinfo=None)
    )
    url = store.presigned_put("late-result")
    monkeypatch.undo()
    assert store.url_lifetime == MAX_URL_LIFETIME
    expiry = presigned_url_expiry(url)
    assert expiry == signed_at.replace(microsecond=0) + datetime.timedelta(days=7)
    assert expiry < datetime.datetime.now(datetime.timezone.utc)


def test_presigned_url_expiry_rejects_an_unsigned_url() -> None:
    with pytest.raises(ValueError, match="SigV4"):
        presigned_url_expiry("http://127.0.0.1:1/bucket/key")


def test_tampered_object_raises_integrity_error_naming_its_url(
    store: S3Store, raw: Any, bucket: str
) -> None:
    key = store.put(b"genuine")
    raw.put_object(Bucket=bucket, Key=f"cache/{key[:2]}/{key}", Body=b"forged!")
    with pytest.raises(IntegrityError, match=f"s3://{bucket}/cache/{key[:2]}/{key}"):
        store.get(key)


def test_get_of_missing_key_raises_key_error(store: S3Store) -> None:
    with pytest.raises(KeyError):
        store.get("b" * 64)
    with pytest.raises(KeyError):
        store.get_named("never-written")


def test_store_takes_credentials_and_endpoint_from_environment(aws_env: None, bucket: str) -> None:
    store = S3Store(f"s3://{bucket}/env")
    try:
        key = store.put(b"configured by AWS_* variables")
        assert store.get(key) == b"configured by AWS_* variables"
        with urllib.request.urlopen(store.presigned_get(key), timeout=10) as response:
            assert response.read() == b"configured by AWS_* variables"
    finally:
        store.close()


def test_missing_bucket_is_one_request_and_a_cache_error_without_secrets(
    aws_env: None,
) -> None:
    store = S3Store("s3://no-such-bucket-here/cache")
    sends = _sends(store.client)
    with pytest.raises(CacheError, match="NoSuchBucket") as caught:
        store.put_named("x", b"x")
    message = str(caught.value)
    assert "s3://no-such-bucket-here/cache/named/x" in message
    assert SECRET not in message
    assert sends == ["PUT"]  # a permanent error: not retried
    store.close()


def test_unreachable_endpoint_is_retried_then_a_cache_error(aws_env: None) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3Store("s3://some-bucket/p", endpoint_url=endpoint, attempts=3)
    sends = _sends(store.client)
    with pytest.raises(CacheError, match="EndpointConnectionError") as caught:
        store.exists("c" * 64)
    assert sends == ["HEAD"] * 3
    assert f"s3://some-bucket/p/cc/{'c' * 64}" in str(caught.value)
    assert SECRET not in str(caught.value)
    store.close()


def test_missing_credentials_raise_cache_error_saying_so(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # No instance metadata service on a laptop or CI runner: fail fast instead.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store("s3://some-bucket/p")
    with pytest.raises(CacheError, match="no AWS credentials"):
        store.exists("d" * 64)
    with pytest.raises(CacheError, match="no AWS credentials"):
        store.presigned_get("d" * 64)
    store.close()


@pytest.mark.parametrize(
    "url", ["http://bucket/prefix", "s3://", "s3:///prefix", "s3://bucket/p?x=1", "bucket/p"]
)
def test_invalid_store_url_raises_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="S3"):
        S3Store(url, client=object())


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "./a", "a/", "x\ny", "n" * 513])
def test_invalid_object_name_raises_value_error(store: S3Store, name: str) -> None:
    with pytest.raises(ValueError, match="object name"):
        store.presigned_put(name)


@pytest.mark.parametrize("lifetime", [0, MAX_URL_LIFETIME + 1])
def test_url_lifetime_outside_sigv4_limits_raises_value_error(lifetime: float) -> None:
    with pytest.raises(ValueError, match="url_lifetime"):
        S3Store("s3://bucket/p", url_lifetime=lifetime, client=object())


def test_client_with_another_endpoint_or_a_region_raises_value_error(
    s3_server: S3Server,
) -> None:
    client = s3_server.client()
    with pytest.raises(ValueError, match="endpoint_url"):
        S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:1", client=client)
    with pytest.raises(ValueError, match="region"):
        S3Store("s3://bucket/p", region="eu-west-1", client=client)
    client.close()


def test_s3_server_refuses_a_taken_port_and_stops_its_process(
    s3_server: S3Server, tmp_path
) -> None:
    with pytest.raises(S3ServerError, match="in use"):
        S3Server(tmp_path / "taken", port=s3_server.port).start()
    with S3Server(tmp_path / "own") as server:
        process = server._process
        assert process is not None
        server.make_bucket("short-lived")
    assert process.poll() is not None
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.endpoint_url + "/moto-api/", timeout=2)


def _grants(raw: Any, bucket: str, object_key: str) -> list[dict]:
    return raw.get_object_acl(Bucket=bucket, Key=object_key)["Grants"]


def test_every_object_the_store_writes_is_private_to_the_bucket_owner(
    s3_server: S3Server, bucket: str, raw: Any
) -> None:
    # Issue 17, item 5: payloads and results never get a public ACL. The store asks for
    # none (buckets with ACLs disabled, the AWS default, refuse any but the owner's), so
    # S3 makes each object the owner's alone.
    store = S3Store(f"s3://{bucket}/c", client=s3_server.client(), multipart_threshold=5 * MiB)
    granted: list[str] = []
    store.client.meta.events.register(
        "before-send.s3",
        lambda request, **_: granted.extend(
            h for h in request.headers if h.lower().startswith(("x-amz-acl", "x-amz-grant"))
        ),
    )
    small = store.put(b"pickled arguments")
    big = store.put(os.urandom(6 * MiB))
    store.put_named("results/direct", b"a result")
    url = store.presigned_put("results/from-a-job")  # as a job delivers a large result
    assert "acl" not in url.lower() and "grant" not in url.lower()
    request = urllib.request.Request(
        url, data=b"r", method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    assert granted == []
    written = [store.object_key(small)]
    written += [store.named_object_key(n) for n in ("results/direct", "results/from-a-job")]
    for object_key in written:
        grants = _grants(raw, bucket, object_key)
        assert [g["Permission"] for g in grants] == ["FULL_CONTROL"], grants
        assert grants[0]["Grantee"]["Type"] == "CanonicalUser"
        # And the server refuses whoever comes without credentials.
        anonymous = f"{s3_server.endpoint_url}/{bucket}/{urllib.parse.quote(object_key)}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=10)
        assert refused.value.code == 403
    # moto keeps no ACL on a multipart object (and serves it to anyone); S3 makes it
    # private like any other. What the store controls is checked above: no ACL asked.
    assert raw.head_object(Bucket=bucket, Key=store.object_key(big))["ContentLength"] == 6 * MiB
