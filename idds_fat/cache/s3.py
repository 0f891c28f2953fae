"""A content store in an S3 bucket: objects at ``s3://BUCKET/PREFIX/ab/abcd…``.

Works with AWS and S3-compatible services (MinIO, Ceph RGW, moto). Credentials,
region and endpoint come from boto3's usual configuration (``AWS_ACCESS_KEY_ID``
and friends, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``~/.aws/config``) unless given to :class:`S3Store`.

Jobs on nodes never need credentials or boto3: the caller hands them presigned
URLs (:meth:`S3Store.presigned_get` for inputs, :meth:`S3Store.presigned_put` for
a result object whose name the caller chooses), which plain ``urllib`` can use.
"""

from __future__ import annotations

import datetime
import io
import logging
import urllib.parse
from typing import Any

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from s3transfer.exceptions import RetriesExceededError

from idds_fat.cache.base import ContentStore, check_key, verify
from idds_fat.errors import CacheError, ConfigError

logger = logging.getLogger(__name__)

MAX_URL_LIFETIME = 7 * 86400  # SigV4 presigned URLs are valid for at most 7 days
NAMED_PREFIX = "named"  # folder of the objects addressed by name, not by content

_TRANSFER_ERRORS = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    boto3.exceptions.Boto3Error,
    RetriesExceededError,
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Store(ContentStore):
    """Objects kept in an S3 bucket under a prefix, fanned out by the first two hex digits.

    Args:
        url: ``s3://BUCKET`` or ``s3://BUCKET/PREFIX``.
        endpoint_url: the S3 endpoint of a non-AWS service
            (``http://minio:9000``); default: ``AWS_ENDPOINT_URL_S3``,
            ``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``, else AWS.
        region: the bucket's region; default: boto3's (``AWS_DEFAULT_REGION``, profile).
        profile: a profile of ``~/.aws/config``; default: ``AWS_PROFILE`` or none.
        url_lifetime: seconds a presigned URL stays valid (1 s to 7 days, the
            SigV4 limit). URLs signed with temporary credentials (STS, SSO)
            also die with those credentials.
        multipart_threshold: objects larger than this are uploaded (and
            downloaded) in parts of this size, in parallel.
        client: a ready boto3 S3 client to use instead of building one; its own
            retry, timeout and signature settings then apply.
        attempts: attempts in all per request, for the client built here.

    Transient failures (connection errors, timeouts, HTTP 5xx, throttling such as
    ``SlowDown``) are retried by botocore's ``standard`` retry mode: ``attempts``
    attempts in all, exponential backoff with jitter capped at 20 s. Every other
    error is a :class:`CacheError` naming the bucket and object, never the
    credentials. Credentials are looked up at the first request, not here.

    Raises:
        ValueError: ``url`` is not ``s3://BUCKET[/PREFIX]``, a number is out of
            range, or ``client`` comes with ``region``/``profile`` or another
            ``endpoint_url``.
        ConfigError: ``profile`` is not in the AWS config files.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        url_lifetime: float = MAX_URL_LIFETIME,
        multipart_threshold: int = 64 * 1024 * 1024,
        client: Any = None,
        attempts: int = 5,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = (
            f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        )
        if not 1 <= url_lifetime <= MAX_URL_LIFETIME:
            raise ValueError(
                f"url_lifetime must be between 1 and {MAX_URL_LIFETIME} seconds "
                f"(7 days, the SigV4 limit), not {url_lifetime}"
            )
        if multipart_threshold < 1:
            raise ValueError(f"multipart_threshold must be positive, not {multipart_threshold}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.url_lifetime = url_lifetime
        self.multipart_threshold = multipart_threshold
        # s3transfer raises the part size to S3's 5 MiB minimum by itself when needed.
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold
        )
        if client is not None:
            if region is not None or profile is not None:
                raise ValueError("give either client or region/profile, not both")
            if endpoint_url is not None and client.meta.endpoint_url != endpoint_url.rstrip("/"):
                raise ValueError(
                    f"endpoint_url {endpoint_url} differs from the client's "
                    f"{client.meta.endpoint_url}"
                )
            self._client = client
            self._owns_client = False
        else:
            self._client = _make_client(endpoint_url, region, profile, attempts)
            self._owns_client = True

    def __repr__(self) -> str:
        return f"S3Store({self.location!r}, endpoint_url={self._client.meta.endpoint_url!r})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client the store uses."""
        return self._client

    def object_key(self, key: str) -> str:
        """Return the S3 object key that holds content ``key`` (``PREFIX/ab/abcd…``).

        Raises ValueError if ``key`` is not a content key.
        """
        check_key(key)
        return self._join(key[:2], key)

    def named_object_key(self, object_name: str) -> str:
        """Return the S3 object key of the named object ``object_name`` (``PREFIX/named/NAME``).

        Raises ValueError if ``object_name`` is empty, absolute, has empty, ``.``
        or ``..`` segments, control characters, or is longer than 512 characters.
        """
        return self._join(NAMED_PREFIX, _check_object_name(object_name))

    def url(self, key: str) -> str:
        """Return the ``s3://`` URL of content ``key`` (for messages; not fetchable by nodes).

        Raises ValueError if ``key`` is not a content key.
        """
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def exists(self, key: str) -> bool:
        """Return whether ``key`` is stored (one ``HEAD`` request).

        Raises CacheError on any answer but success or 404 (a 403 may mean the
        credentials lack ``s3:ListBucket``, for which S3 hides missing objects),
        or when S3 cannot be reached.
        """
        return self._head(self.object_key(key))

    def _write(self, key: str, data: bytes) -> None:
        self._upload(self.object_key(key), data)
        logger.debug("stored %s (%d bytes) in %s", key, len(data), self.location)

    def get(self, key: str) -> bytes:
        """Return the bytes stored under ``key``, verified against it.

        Raises:
            KeyError: nothing is stored under ``key``.
            IntegrityError: the stored bytes do not match ``key`` (names the s3:// URL).
            CacheError: S3 cannot be reached or answered another error.
        """
        data = self._download(self.object_key(key), missing=key)
        return verify(key, data, self.url(key))

    def presigned_get(self, key: str) -> str:
        """Return an HTTP(S) URL from which anyone can ``GET`` content ``key``, no
        credentials needed, for ``url_lifetime`` seconds.

        The object need not exist yet. Raises ValueError if ``key`` is not a
        content key, CacheError if the URL cannot be signed (no credentials).
        """
        return self._presign("get_object", self.object_key(key))

    def presigned_put(self, object_name: str) -> str:
        """Return an HTTP(S) URL to which anyone can ``PUT`` the named object
        ``object_name``, no credentials needed, for ``url_lifetime`` seconds.

        For objects whose content is not known in advance (a job's result): the
        caller picks a unique name and reads the object back with
        :meth:`get_named`. The uploader may send any ``Content-Type``; sending
        ``application/octet-stream`` keeps form-parsing servers off the body.

        Raises ValueError for an invalid name (see :meth:`named_object_key`),
        CacheError if the URL cannot be signed (no credentials).
        """
        return self._presign("put_object", self.named_object_key(object_name))

    def put_named(self, object_name: str, data: bytes) -> None:
        """Store ``data`` as the named object ``object_name``, replacing any old one.

        Raises ValueError for an invalid name, CacheError when S3 refuses or
        cannot be reached.
        """
        self._upload(self.named_object_key(object_name), data)

    def get_named(self, object_name: str) -> bytes:
        """Return the bytes of the named object ``object_name`` (not verified: it has
        no content key; results carry their own HMAC).

        Raises:
            KeyError: no such object.
            ValueError: ``object_name`` is not a valid name.
            CacheError: S3 cannot be reached or answered another error.
        """
        return self._download(self.named_object_key(object_name), missing=object_name)

    def delete_named(self, object_name: str) -> None:
        """Delete the named object ``object_name``; deleting a missing one is no error.

        Raises ValueError for an invalid name, CacheError when S3 refuses or
        cannot be reached.
        """
        object_key = self.named_object_key(object_name)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=object_key)
        except _TRANSFER_ERRORS as exc:
            raise _cache_error("DELETE", self.bucket, object_key, exc) from exc

    def close(self) -> None:
        """Close the client's connections if the store built the client itself."""
        if self._owns_client:
            self._client.close()

    def _join(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    def _head(self, object_key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=object_key)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return False
            raise _cache_error("HEAD", self.bucket, object_key, exc) from exc
        except _TRANSFER_ERRORS as exc:
            raise _cache_error("HEAD", self.bucket, object_key, exc) from exc
        return True

    def _upload(self, object_key: str, data: bytes) -> None:
        try:
            # upload_fileobj switches to a parallel multipart upload above the
            # threshold and aborts the multipart upload if a part fails for good.
            self._client.upload_fileobj(
                io.BytesIO(data), self.bucket, object_key, Config=self._transfer
            )
        except _TRANSFER_ERRORS as exc:
            raise _cache_error("PUT", self.bucket, object_key, exc) from exc

    def _download(self, object_key: str, missing: str) -> bytes:
        buffer = io.BytesIO()
        try:
            self._client.download_fileobj(self.bucket, object_key, buffer, Config=self._transfer)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                raise KeyError(missing) from None
            raise _cache_error("GET", self.bucket, object_key, exc) from exc
        except _TRANSFER_ERRORS as exc:
            raise _cache_error("GET", self.bucket, object_key, exc) from exc
        return buffer.getvalue()

    def _presign(self, method: str, object_key: str) -> str:
        try:
            return self._client.generate_presigned_url(
                method,
                Params={"Bucket": self.bucket, "Key": object_key},
                ExpiresIn=int(self.url_lifetime),
            )
        except _TRANSFER_ERRORS as exc:
            raise _cache_error("presign", self.bucket, object_key, exc) from exc


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://BUCKET/PREFIX`` into ``(BUCKET, PREFIX)``; the prefix has no
    leading or trailing slash and may be empty.

    Raises ValueError if ``url`` is not an ``s3://`` URL with a bucket, or has a
    query or fragment.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 cache location (s3://BUCKET/PREFIX): {url!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"S3 cache location must have no query or fragment: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def presigned_url_expiry(url: str) -> datetime.datetime:
    """Return when the SigV4 presigned ``url`` expires (an aware UTC datetime).

    Lets a caller re-sign before handing an old URL to a job (a resubmitted or
    long-queued one) instead of letting S3 refuse it with HTTP 403.

    Raises ValueError if ``url`` has no ``X-Amz-Date`` and ``X-Amz-Expires``.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    try:
        signed = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
        lifetime = int(query["X-Amz-Expires"][0])
    except (KeyError, ValueError):
        raise ValueError("not a SigV4 presigned URL (no X-Amz-Date / X-Amz-Expires)") from None
    signed = signed.replace(tzinfo=datetime.timezone.utc)
    return signed + datetime.timedelta(seconds=lifetime)


def _make_client(
    endpoint_url: str | None, region: str | None, profile: str | None, attempts: int
) -> Any:
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound as exc:
        raise ConfigError(f"S3 cache: {exc}") from exc
    config = Config(
        # Presigned URLs must be SigV4: botocore would otherwise sign some regions
        # with SigV2, which other S3 services reject.
        signature_version="s3v4",
        # total_max_attempts counts the first try; the older max_attempts key counts
        # only retries.
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=10.0,
        read_timeout=60.0,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _is_missing(exc: botocore.exceptions.ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # A missing bucket is a configuration error, not a missing object.
    return error.get("Code") != "NoSuchBucket" and (
        error.get("Code") in _MISSING_CODES or status == 404
    )


def _cache_error(operation: str, bucket: str, object_key: str, exc: Exception) -> CacheError:
    where = f"{operation} s3://{bucket}/{object_key}"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        code = error.get("Code", "?")
        message = error.get("Message", "")
        text = f"{where}: {code} (HTTP {status})" + (f": {message}" if message else "")
        if code == "NoSuchBucket":
            text += f"; create bucket {bucket!r} or fix the cache location"
        return CacheError(text)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return CacheError(
            f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials)"
        )
    # botocore's messages name endpoints and operations, never credentials.
    return CacheError(f"{where}: {type(exc).__name__}: {exc}")


def _check_object_name(object_name: str) -> str:
    parts = object_name.split("/")
    if (
        not object_name
        or len(object_name) > 512
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in object_name)
    ):
        raise ValueError(
            f"invalid object name {object_name[:80]!r}: give 1-512 characters, "
            "'/'-separated segments that are not empty, '.' or '..', no control characters"
        )
    return object_name
