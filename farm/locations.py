"""Where things live, checked as written: s3:// and hf:// locations and MLflow tracking URIs.

Pure string rules, applied by the spec's validators, so a malformed location is one line naming the field
before anything connects (an empty bucket otherwise surfaces as a credentials or connection error from boto, or
a key read as a bucket).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# S3's bucket naming rules (general purpose buckets): 3-63 characters, lower-case letters, digits, dots and
# hyphens, beginning and ending with a letter or digit, not an IP address.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
TRACKING_SCHEMES = (
    "http",
    "https",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "file",
    "databricks",
    "databricks-uc",
)


def check_s3(value: str) -> str:
    """`s3://bucket[/key/...]`: a valid bucket name and no empty path segment; returns the value."""
    rest = value.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{value!r} names no bucket (expected s3://bucket/prefix)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP.fullmatch(bucket):
        raise ValueError(f"{value!r}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, '.', '-')")
    if key and "" in key.rstrip("/").split("/"):
        raise ValueError(f"{value!r} has an empty path segment ('//')")
    return value


def check_hf(value: str) -> str:
    """`hf://org/name[@revision]`."""
    repo, _, rev = value.removeprefix("hf://").partition("@")
    if not _HF_REPO.fullmatch(repo):
        raise ValueError(f"{value!r} is not a hub repository (expected hf://org/name[@revision])")
    if "@" in value and not rev:
        raise ValueError(f"{value!r} has an empty revision after '@'")
    return value


def check_location(value: str) -> str:
    """A model, text or output location: the s3:// and hf:// forms are checked, other text passes (local
    paths, and the schemes the readers themselves refuse with a list of what they take)."""
    if value.startswith("s3://"):
        return check_s3(value)
    if value.startswith("hf://"):
        return check_hf(value)
    if value.lower().startswith(("s3:", "hf:")) and "://" not in value:
        raise ValueError(f"{value!r}: expected {value.split(':')[0].lower()}://...")
    return value


def check_tracking_uri(uri: str) -> str:
    """An MLflow tracking URI farm can open: a known scheme, a host for servers, a path for sqlite and files."""
    if not uri or uri != uri.strip() or any(c.isspace() for c in uri):
        raise ValueError(f"{uri!r} is not a URI (it is empty or has spaces)")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2://, mysql+pymysql://
    if base not in TRACKING_SCHEMES:
        raise ValueError(
            f"{uri!r} is not a tracking URI farm takes (use http(s)://host:port, sqlite:///path/mlflow.db, "
            "postgresql://..., mysql://..., file:///dir or databricks)"
        )
    if base in ("http", "https") and not parts.hostname:
        raise ValueError(f"{uri!r} names no host")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"{uri!r} has a port that is not a number") from None
    if base == "sqlite" and (not uri.startswith("sqlite:///") or len(uri) <= len("sqlite:///")):
        raise ValueError(f"{uri!r}: expected sqlite:///path/to/mlflow.db (or sqlite:////absolute/path)")
    if base in ("postgresql", "mysql", "mssql") and not parts.hostname and not parts.path.strip("/"):
        raise ValueError(f"{uri!r} names no database")
    if base == "file" and not parts.path:
        raise ValueError(f"{uri!r} names no directory")
    return uri
