"""Errors that no retry can fix fail at the first attempt, naming what to check (issue #22 item 7): no credentials,
rejected credentials, access denied, a bucket that does not exist. Against the moto server (tests/plugins/s3.py);
only transient errors are retried (tests/test_io.py covers outages)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ditscale.errors import StorageError
from ditscale.io import storage

CODE = """
import sys, time
from ditscale.io import storage
from ditscale.errors import StorageError
t = time.monotonic()
try:
    storage.read_bytes(sys.argv[1])
except StorageError as e:
    print(f"{time.monotonic() - t:.1f}|{e}")
"""


def _no_credentials_env(s3_server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return dict(env, AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION="us-east-1",
                AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
                AWS_EC2_METADATA_DISABLED="true", DITSCALE_STORAGE_RETRY_SECONDS="120")  # fmt: skip


def test_missing_credentials_fail_at_once_naming_the_variables(s3_server):
    url = s3_server.bucket() + "/run/final.json"
    r = subprocess.run([sys.executable, "-c", CODE, url], env=_no_credentials_env(s3_server), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert "|" in r.stdout, r.stderr[-3000:]
    took, message = r.stdout.strip().split("|", 1)
    assert "after" not in message and "attempt" not in message, message  # no retries
    assert "no credentials were found" in message and "AWS_ACCESS_KEY_ID" in message and url in message
    assert "retry" not in r.stderr


def test_no_such_bucket_is_an_error_not_a_missing_file(s3_server):
    url = "s3://no-such-bucket-ditscale/run/final.json"
    with pytest.raises(StorageError, match="no such bucket") as e:
        storage.read_bytes_or_none(url)
    assert "no-such-bucket-ditscale" in str(e.value) and "attempt" not in str(e.value)
    with pytest.raises(StorageError, match="no such bucket"):
        storage.listdir("s3://no-such-bucket-ditscale/runs")
    # a missing key in a bucket that exists is still just missing
    assert storage.read_bytes_or_none(s3_server.bucket() + "/nothing.json") is None


def test_classification_of_client_errors():
    """The S3 error codes that no retry fixes, as botocore raises them and as s3fs translates them."""
    from botocore.exceptions import ClientError, NoCredentialsError

    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")

    for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "NoSuchBucket"):
        assert storage._fatal(client_error(code)), code
        wrapped = PermissionError(code)
        wrapped.__cause__ = client_error(code)
        assert storage._fatal(wrapped)
    assert "AWS_SECRET_ACCESS_KEY" in storage.describe(client_error("SignatureDoesNotMatch"))
    assert storage._fatal(NoCredentialsError()) and "AWS_ACCESS_KEY_ID" in storage.describe(NoCredentialsError())
    assert not storage._fatal(client_error("SlowDown")) and not storage._fatal(ConnectionError("reset"))
