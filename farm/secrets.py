"""Keeping credentials out of everything farm prints or records (MLflow params/tags/artifacts, manifests,
logs, error lines)."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"://[^/@\s\"']+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|key|secret|password|passwd|signature|x-amz-[a-z-]+)=)[^&\s\"']+")


def redact(text: str) -> str:
    """Replace `user:password@` in URIs and secret-looking query parameters with ***."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("://***@", text))
