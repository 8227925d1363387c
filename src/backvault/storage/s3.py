"""S3-compatible object storage (boto3), with restic's layout under a bucket and a prefix.

Credentials, region and profile come from the usual AWS places (environment, shared
config and credentials files, instance roles). Uploads carry a SHA-256 checksum the server
verifies; objects of 8 MiB and more go up in multipart parts.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from backvault.storage.base import (
    Backend,
    BackendSpec,
    FileType,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
    StorageRefused,
    TransientStorageError,
    object_path,
)

MULTIPART_THRESHOLD = 8 * 1024 * 1024
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Backend(Backend):
    def __init__(
        self, endpoint: str | None, bucket: str, prefix: str, location: str, timeout: float = 120.0
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.location = location
        self._options = {
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": prefix,
            "location": location,
            "timeout": timeout,
        }
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"},  # we retry, with jitter
                connect_timeout=15,
                read_timeout=timeout,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=16,
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            use_threads=False,
        )

    def spec(self) -> BackendSpec:
        return BackendSpec(S3Backend, tuple(self._options.items()))

    def _key(self, kind: FileType, name: str) -> str:
        path = object_path(kind, name)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        try:
            return fn(*args, **kwargs)
        except NoCredentialsError as exc:
            raise StorageAccessDenied(
                f"{self.location}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _MISSING_CODES or status == 404:
                raise ObjectNotFound(f"{what} is missing from the repository") from exc
            if code in _ACCESS_CODES or status in (401, 403):
                raise StorageAccessDenied(
                    f"{self.location}: S3 refused the credentials ({code or status}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy"
                ) from exc
            if code == "NoSuchBucket":
                raise StorageError(
                    f"{self.location}: the bucket {self.bucket!r} does not exist"
                ) from exc
            if status >= 500 or code in (
                "SlowDown",
                "RequestTimeout",
                "InternalError",
                "ServiceUnavailable",
            ):
                raise TransientStorageError(f"{self.location}: {code or status} on {what}") from exc
            raise StorageError(
                f"{self.location}: {code or status} on {what}: {error.get('Message', '')}"
            ) from exc
        except (BotoConnectionError, ReadTimeoutError) as exc:
            raise TransientStorageError(
                f"{self.location}: connection failed on {what}: {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise TransientStorageError(f"{self.location}: {exc}") from exc

    def create(self) -> None:
        if self.exists():
            raise StorageError(f"a repository already exists at {self.location}")
        try:
            self._call("bucket", self._client.head_bucket, Bucket=self.bucket)
        except ObjectNotFound:
            self._call("bucket", self._client.create_bucket, Bucket=self.bucket)

    def exists(self) -> bool:
        try:
            self.stat(FileType.CONFIG, "config")
        except ObjectNotFound:
            return False
        except StorageError as exc:
            if "does not exist" in str(exc):
                return False
            raise
        return True

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        key = self._key(kind, name)
        if len(data) >= MULTIPART_THRESHOLD:
            self._call(
                key,
                self._client.upload_fileobj,
                io.BytesIO(data),
                self.bucket,
                key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=self._transfer,
            )
        else:
            self._call(
                key,
                self._client.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ChecksumAlgorithm="SHA256",
            )

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(kind, name)
        extra: dict[str, str] = {}
        if offset < 0:
            extra["Range"] = f"bytes={offset}"
        elif offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"
        if length == 0:
            return b""
        response = self._call(key, self._client.get_object, Bucket=self.bucket, Key=key, **extra)
        return bytes(self._call(key, response["Body"].read))

    def stat(self, kind: FileType, name: str) -> int:
        key = self._key(kind, name)
        response = self._call(key, self._client.head_object, Bucket=self.bucket, Key=key)
        return int(response["ContentLength"])

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        if kind is FileType.CONFIG:
            if self.exists():
                yield "config", self.stat(FileType.CONFIG, "config")
            return
        prefix = self._key(kind, "x")[: -len("x")]
        if kind is FileType.DATA:
            prefix = prefix.rsplit("/", 2)[0] + "/"  # data/ and its 2-digit subfolders
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(
            prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"].rsplit("/", 1)[-1], int(item["Size"])

    def remove(self, kind: FileType, name: str) -> None:
        key = self._key(kind, name)
        try:
            self._call(key, self._client.delete_object, Bucket=self.bucket, Key=key)
        except StorageAccessDenied as exc:
            raise StorageRefused(f"{self.location} refuses to delete {key}: {exc}") from exc

    def close(self) -> None:
        self._client.close()
