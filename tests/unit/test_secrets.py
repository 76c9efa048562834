"""Credentials never survive `redact`, and nothing else is changed."""

from __future__ import annotations

import pytest

from farm.secrets import redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("http://farm:hunter2@mlflow:5000", "hunter2"),
        ("postgresql+psycopg2://user:pw0rd@db/mlflow", "pw0rd"),
        ("s3://bucket/x?X-Amz-Signature=abc123&X-Amz-Credential=AKIA42", "abc123"),
        ("https://hub/x?token=hf_secret&rev=main", "hf_secret"),
        ('{"uri": "http://a:b3@host"}', "b3"),
    ],
)
def test_secrets_removed(text: str, secret: str) -> None:
    assert secret not in redact(text)


def test_plain_text_unchanged() -> None:
    for text in ("s3://bucket/prefix/model", "/data/models/m", "hf://org/name@main", "http://127.0.0.1:5000"):
        assert redact(text) == text
