"""Model sources against real servers: an s3:// checkpoint on the moto server has the same content identity
(and so the same variant ids) as the same files on local disk; a missing prefix is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm import sources
from farm.errors import SourceError
from tests.integration.conftest import BUCKET, Stack, s3fs_client

pytestmark = pytest.mark.integration


def test_s3_source_identity_matches_local(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    local = fixture_paths["tiny-llama"]
    fs = s3fs_client(stack)
    for f in local.iterdir():
        fs.put(str(f), f"{BUCKET}/models/tiny/{f.name}")
    fs.put(str(local / "config.json"), f"{BUCKET}/models/tiny/pytorch_model.bin")  # a pickle is never fetched
    remote = sources.resolve(f"s3://{BUCKET}/models/tiny")
    assert remote.identity == sources.resolve(str(local)).identity
    assert not (Path(remote.local_dir) / "pytorch_model.bin").exists()
    again = sources.resolve(f"s3://{BUCKET}/models/tiny")  # cached: no second download
    assert again.local_dir == remote.local_dir


def test_missing_s3_prefix(stack: Stack, stack_env: dict) -> None:
    with pytest.raises(SourceError, match=r"no such prefix|cannot list"):
        sources.resolve(f"s3://{BUCKET}/models/absent")


def test_s3_source_without_credentials_is_one_line(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack.s3_endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError, match=r"cannot read from \S+ \(NoCredentialsError") as err:
        sources.resolve(f"s3://{BUCKET}/models/tiny")
    assert "\n" not in str(err.value)


def test_s3_calibration_text_has_the_local_identity(stack: Stack, stack_env: dict, fixture_paths: dict) -> None:
    from farm.calibration import TextIdentity, mixture_source

    local = fixture_paths["shakespeare"] / "heldout.txt"
    s3fs_client(stack).put(str(local), f"{BUCKET}/text/heldout.txt")
    remote = f"s3://{BUCKET}/text/heldout.txt"
    assert TextIdentity.of(remote).sha256 == TextIdentity.of(str(local)).sha256
    assert (
        TextIdentity.of(mixture_source([(remote, 1.0)])).sha256
        == TextIdentity.of(mixture_source([(str(local), 1.0)])).sha256
    )
    from farm.errors import SpecError

    with pytest.raises(SpecError, match="no such object"):
        TextIdentity.of(f"s3://{BUCKET}/text/absent.txt")
