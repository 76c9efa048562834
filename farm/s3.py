"""One S3 client configuration for every S3 call farm makes (model sources, calibration text, artifacts).

Every call has a connect and a read timeout and bounded retries, so an endpoint that hangs (a stopped server
whose connections stay open) fails the call in about two minutes at most, with one line naming the endpoint,
instead of stalling a job. farm's publish step retries whole steps on top of this (`artifacts.ArtifactStore`).
"""

from __future__ import annotations

import os
from typing import Any

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30  # per socket read: a large object streams in many reads
ATTEMPTS = 2  # botocore's own attempts per request; s3fs retries a failed call as many times


def filesystem() -> Any:
    """A fresh s3fs filesystem (credentials are read now: a long-lived watcher sees rotations)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": ATTEMPTS},
        },
    )
    fs.retries = ATTEMPTS
    return fs


def endpoint() -> str:
    """The S3 endpoint calls go to, for error lines (credentials never appear in it: see `secrets.redact`)."""
    from farm.secrets import redact

    return redact(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")
