"""Model sources and their content identity.

`hf://org/name@rev` (huggingface_hub cache; honours HF_HUB_OFFLINE), `s3://bucket/prefix` (s3fs, copied once
into a local cache) and local directories. The identity - a hub commit sha, or a hash over the weight and
config files' contents - keys variant ids, manifests and registry tags. Only safetensors weights load: pickle
checkpoints (.bin/.pt) can run code when loaded, so they are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.calibration import file_sha256, sha256_many
from farm.errors import SourceError, SpecError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Besides the weights, the identity covers every file that changes what the model computes or how it is
# prompted: config, generation config, tokenizer files, special tokens, chat template, processor configs and
# remote code. Documentation files do not count.
IDENTITY_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".vocab")
NOT_IDENTITY = re.compile(r"^(readme|license|licence|notice|copying|citation|use_policy)", re.IGNORECASE)
HF_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.txt", "*.model"]


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    kind: str  # "local" | "hf" | "s3"
    local_dir: str
    identity: str
    revision: str | None
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in Path(self.local_dir).glob("*.safetensors"))


def cache_root() -> Path:
    return Path(os.environ.get("FARM_CACHE", Path.home() / ".cache" / "farm"))


def weight_files(directory: Path, allow_pickle: bool = False) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files and allow_pickle:
        files = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return files


def cached_file_sha256(path: Path) -> str:
    """A file's sha256, remembered under FARM_CACHE by (path, size, mtime): re-running a job on an 8B checkpoint
    does not re-read 16 GB. A file rewritten in place with the same size and mtime would be missed; farm's own
    writes never do that."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "sha256" / key
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(memo)
    except OSError:
        pass  # a read-only cache only costs time
    return digest


def identity_files(directory: Path) -> list[Path]:
    """The checkpoint's files, other than weights, that its identity covers (see IDENTITY_SUFFIXES)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file()
        and (p.suffix in IDENTITY_SUFFIXES or p.name.startswith("tokenizer"))
        and not NOT_IDENTITY.match(p.name)
    )


def content_identity(directory: Path, allow_pickle: bool = False) -> str:
    """sha256 over (file name, file sha256) of every weight shard and every file `identity_files` names: two
    checkpoints with the same weights but another tokenizer, chat template or generation config differ."""
    files = weight_files(directory, allow_pickle) + identity_files(directory)
    shas = sha256_many(files, cached_file_sha256)
    h = hashlib.sha256()
    for f, sha in zip(files, shas, strict=True):
        h.update(f"{f.name}\0{sha}\n".encode())
    return "sha256:" + h.hexdigest()


MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, from its header alone (None: nothing): a truncated or
    corrupt shard is found before any run is created, not when a worker loads it minutes later."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                return f"header length {n} does not fit the file ({size} bytes): not safetensors, or corrupt"
            raw = f.read(n)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    try:
        header = json.loads(raw)
    except ValueError:
        return "its header is not JSON: corrupt"
    if not isinstance(header, dict):
        return "its header is not a JSON object: corrupt"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
            or "dtype" not in entry
            or "shape" not in entry
        ):
            return f"tensor {name!r} has a malformed header entry: corrupt"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"truncated: its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def check_weights(directory: Path, source: str) -> None:
    for f in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise SourceError(f"model {source}: {f.name} {problem}")


def check_checkpoint(directory: Path, source: str, allow_pickle: bool = False) -> dict[str, Any]:
    if not directory.is_dir():
        raise SourceError(f"model {source}: no such directory")
    if not (directory / "config.json").is_file():
        raise SourceError(f"model {source}: no config.json")
    if not weight_files(directory, allow_pickle):
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise SourceError(
                f"model {source}: only pickle checkpoints ({', '.join(sorted(pickles)[:3])}); farm loads "
                "safetensors (set allow_pickle: true on the model to accept them)"
            )
        raise SourceError(f"model {source}: no *.safetensors weights")
    check_weights(directory, source)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"model {source}: unreadable config.json ({err})") from None
    if not isinstance(config, dict):
        raise SourceError(f"model {source}: config.json is not a JSON object")
    return config


def split_hf(source: str, revision: str | None) -> tuple[str, str]:
    ref = source.removeprefix("hf://")
    repo, _, rev = ref.partition("@")
    return repo, (rev or revision or "main")


def _resolve_hf(source: str, revision: str | None, allow_pickle: bool) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, rev = split_hf(source, revision)
    try:
        patterns = HF_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
        path = Path(snapshot_download(repo, revision=rev, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise SourceError(f"model {source}: not available ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    config = check_checkpoint(path, source, allow_pickle)
    # snapshot directories are named by the commit sha the revision resolved to
    return ResolvedModel(source, "hf", str(path), f"hf:{repo}@{path.name}", path.name, config)


def _resolve_s3(source: str, identify: bool, allow_pickle: bool) -> ResolvedModel:
    from botocore.exceptions import BotoCoreError, ClientError

    from farm import s3

    fs = s3.filesystem()
    prefix = source.removeprefix("s3://").rstrip("/")
    try:
        listing = fs.ls(prefix, detail=True, refresh=True)
        files = {Path(o["name"]).name: o for o in listing if o.get("type") == "file"}
        if not files:
            raise FileNotFoundError(prefix)
        # The cache key includes ETags and sizes, so a changed object is fetched again.
        key = hashlib.sha256(json.dumps(sorted((n, o.get("ETag"), o.get("size")) for n, o in files.items())).encode())
        dest = cache_root() / "s3" / key.hexdigest()[:32]
        if not (dest / ".complete").exists():
            dest.mkdir(parents=True, exist_ok=True)
            for name, obj in files.items():
                if allow_pickle or not name.endswith(PICKLE_SUFFIXES):
                    fs.get(obj["name"], str(dest / name))
            (dest / ".complete").write_text(source)
    except FileNotFoundError:
        raise SourceError(f"model {source}: no such prefix or it is empty") from None
    except PermissionError as err:
        raise SourceError(f"model {source}: access denied ({err})") from None
    except (OSError, BotoCoreError, ClientError) as err:  # credentials missing or refused, endpoint down
        raise SourceError(f"model {source}: cannot read from {s3.endpoint()} ({type(err).__name__}: {err})") from None
    config = check_checkpoint(dest, source, allow_pickle)
    identity = content_identity(dest, allow_pickle) if identify else ""
    return ResolvedModel(source, "s3", str(dest), identity, None, config)


def resolve(
    source: str, revision: str | None = None, identify: bool = True, allow_pickle: bool = False
) -> ResolvedModel:
    """Locate a model, check it holds loadable safetensors weights, and compute its identity. Workers pass
    `identify=False`: the driver already hashed the checkpoint, and hashing an 8B model costs ~15 s."""
    if source.startswith("hf://"):
        return _resolve_hf(source, revision, allow_pickle)
    if source.startswith("s3://"):
        return _resolve_s3(source, identify, allow_pickle)
    if "://" in source:
        raise SourceError(f"model {source}: unsupported scheme (use hf://, s3:// or a local path)")
    path = Path(source)
    config = check_checkpoint(path, source, allow_pickle)
    identity = content_identity(path, allow_pickle) if identify else ""
    return ResolvedModel(source, "local", str(path.resolve()), identity, None, config)


def adapter_identity(path: str) -> str:
    """Content hash of an adapter directory (config + weights); a retrained adapter is a new evaluation."""
    root = Path(path)
    if not (root / "adapter_config.json").is_file():
        raise SpecError(f"adapter {path}: no adapter_config.json (not a PEFT adapter directory)")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors"}):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tokenizer_problem(directory: str, texts: dict[str, str]) -> str | None:
    """Which of `texts` (what -> a sample of it) the checkpoint's tokenizer turns into no tokens (None: each gives
    some). Read with the `tokenizers` library from tokenizer.json, so preflight loads neither torch nor
    transformers; a checkpoint without tokenizer.json (a SentencePiece-only tokenizer) is checked by its worker."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # a tokenizer.json the library cannot read is itself the problem
        return f"its tokenizer.json cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    for what, sample in texts.items():
        try:
            ids = tokenizer.encode(sample, add_special_tokens=False).ids
        except Exception as err:
            return f"its tokenizer (tokenizer.json) cannot tokenize the {what} ({str(err).splitlines()[0][:200]})"
        if sample.strip() and not ids:
            return f"its tokenizer (tokenizer.json) turns the {what} into no tokens"
    return None
