"""What is the current release of a base? A content identity, read without building anything.

Hub bases ask a `HubClient` which commit a branch points at (the client is injected, so tests and air-gapped
sites control it); S3 and local bases hash their weight shards and config through `sources.resolve`, whose
caches make an unchanged base cost a listing and a few stats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farm import sources
from farm.errors import SourceError
from farm.spec import ModelSpec


@dataclass(frozen=True)
class Release:
    base: str
    source: str
    identity: str
    revision: str | None  # the hub commit a branch resolved to; None for S3/local


class HubClient(Protocol):
    def head(self, repo: str, branch: str) -> str:
        """The commit sha `branch` of model repo `repo` points at now."""
        ...


class HuggingFaceHub:
    """huggingface_hub: the Hub API online; with HF_HUB_OFFLINE=1, the ref recorded in the local cache."""

    def head(self, repo: str, branch: str) -> str:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
            from huggingface_hub.constants import HF_HUB_CACHE

            ref = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / branch
            try:
                return ref.read_text().strip()
            except OSError:
                raise SourceError(f"hf://{repo}@{branch}: not in the local cache (HF_HUB_OFFLINE is set)") from None
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            sha = HfApi().model_info(repo, revision=branch).sha
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise SourceError(f"hf://{repo}@{branch}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        if not sha:
            raise SourceError(f"hf://{repo}@{branch}: the hub returned no commit")
        return sha


def detect(base: ModelSpec, hub: HubClient) -> Release:
    """The base's current release; SourceError (one line) when it is missing, empty or unreadable."""
    name = base.display_name()
    if base.source.startswith("hf://"):
        repo, branch = sources.split_hf(base.source, base.revision)
        sha = hub.head(repo, branch)
        return Release(name, base.source, f"hf:{repo}@{sha}", sha)
    resolved = sources.resolve(base.source, allow_pickle=base.allow_pickle)
    return Release(name, base.source, resolved.identity, None)
