"""The artifact store: quantized variants under a local root or an s3:// prefix.

A variant becomes visible only when complete: locally it is staged in a temporary directory and renamed into
place; on S3 its files are uploaded first and `manifest.json` last, and readers treat a prefix without a
manifest as absent. Keys are built from validated names and hex ids, and checked to stay under the root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from farm.calibration import sha256_many

MANIFEST = "manifest.json"
T = TypeVar("T")
log = logging.getLogger(__name__)


def file_table(directory: str | Path, workers: int = 8) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file (on `workers` threads)."""
    root = Path(directory)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
    shas = sha256_many(files, workers=workers)
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha} for p, sha in zip(files, shas, strict=True)
    }


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link where the artifact root shares the scratch directory's filesystem (a checkpoint of many GB is
    published without copying a byte), copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# Errors that retrying cannot fix: missing files, refused credentials, programming errors.
PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError, TypeError, ValueError, AttributeError, KeyError)


class PublishError(OSError):
    """An artifact could not be published after retries; nothing of it is visible."""


def with_retries(
    what: str,
    fn: Callable[[], T],
    attempts: int = 4,
    base_delay: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn`, retrying transient storage errors with exponential backoff (0.5 s, 1 s, 2 s, ...)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # network errors arrive as OSError or botocore exceptions
            if isinstance(err, PERMANENT) or attempt == attempts:
                raise PublishError(f"{what} failed after {attempt} attempt(s): {type(err).__name__}: {err}") from err
            log.warning("%s failed (%s), retry %d/%d", what, err, attempt, attempts - 1)
            sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class ArtifactStore:
    def __init__(self, root: str, attempts: int = 4, base_delay: float = 0.5):
        self.root = root.rstrip("/")
        self.is_s3 = root.startswith("s3://")
        self.attempts = attempts
        self.base_delay = base_delay

    def _fs(self) -> Any:
        from farm import s3

        # s3fs's own retries cover throttling; farm's retries cover whole-step failures (connection resets).
        return s3.filesystem()

    def key(self, *parts: str) -> str:
        rel = PurePosixPath(*parts)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact key {rel} escapes the artifact root")
        return f"{self.root}/{rel}"

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        target = f"{key}/{MANIFEST}"
        try:
            if self.is_s3:
                with self._fs().open(target, "rb") as f:
                    return json.load(f)
            return json.loads(Path(target).read_text())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def problem(self, key: str, variant_id: str) -> str | None:
        """Why the published variant at `key` cannot be reused (None: it can): no manifest, another variant's
        manifest, or a file the manifest lists that is missing or has another size."""
        manifest = self.read_manifest(key)
        if manifest is None:
            return f"no manifest at {key}"
        if manifest.get("variant_id") != variant_id:
            return f"the manifest at {key} is another variant's"
        listed: dict[str, Any] = manifest.get("files") or {}
        try:
            if self.is_s3:
                found = self._fs().find(key, detail=True)
                sizes = {name[len(key.removeprefix("s3://")) + 1 :]: o.get("size") for name, o in found.items()}
            else:
                root = Path(key)
                sizes = {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()}
        except OSError as err:
            return f"cannot list {key} ({err})"
        for name, entry in listed.items():
            if sizes.get(name) != entry.get("bytes"):
                return f"{key}/{name} is {'missing' if name not in sizes else 'not the size its manifest says'}"
        return None

    def publish(self, local_dir: str | Path, key: str, manifest: dict[str, Any]) -> str:
        """Copy a finished variant to `key` and make it visible by writing its manifest last."""
        body = json.dumps(manifest, indent=2, sort_keys=True)
        if self.is_s3:
            fs = self._fs()

            def upload() -> None:
                if fs.exists(key):
                    fs.rm(key, recursive=True)  # a partial upload from an earlier attempt; it had no manifest
                fs.put(str(local_dir).rstrip("/") + "/", key + "/", recursive=True)

            def seal() -> None:
                with fs.open(f"{key}/{MANIFEST}", "wb") as f:
                    f.write(body.encode())

            try:
                with_retries(f"upload to {key}", upload, self.attempts, self.base_delay)
                with_retries(f"manifest of {key}", seal, self.attempts, self.base_delay)
            except PublishError:
                with contextlib.suppress(Exception):
                    fs.rm(key, recursive=True)  # leave no partial files behind (they were invisible anyway)
                raise
            return key
        final = Path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            shutil.copytree(local_dir, staging, dirs_exist_ok=True, copy_function=link_or_copy)
            (staging / MANIFEST).write_text(body)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return str(final)
