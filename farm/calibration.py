"""Calibration and evaluation text: loading, deterministic sampling by seed, and content hashes.

A calibration identity is (content hash of the source, samples, sequence length, seed): a variant calibrated
on different text or a different draw is a different variant.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import InputChanged, SpecError

CHARS_PER_TOKEN_BOUND = 8  # generous: a window of this many chars per token always tokenizes to enough tokens


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_many(paths: list[Path], one: Callable[[Path], str] = file_sha256, workers: int = 8) -> list[str]:
    """`one` over many files on threads (reads and hashlib release the GIL): a checkpoint in several shards
    hashes at several times one core's speed."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return list(pool.map(one, paths))


MIX = "mix:"


def mixture_source(items: list[tuple[str, float]]) -> str:
    """One source string for a weighted mixture, so a mixture travels (and is hashed) like a single source."""
    return MIX + json.dumps([[src, float(w)] for src, w in items])


def parts(source: str) -> list[tuple[str, float]]:
    if source.startswith(MIX):
        return [(str(src), float(w)) for src, w in json.loads(source[len(MIX) :])]
    return [(source, 1.0)]


HF_DATASET = "hf-dataset://"


def _hf_dataset_text(source: str) -> str:
    """`hf-dataset://org/name[@revision][?split=train&column=text&config=NAME]`: a Hugging Face dataset from
    the local hub cache (`hf download --repo-type dataset ...`; fetched if the hub is reachable and
    HF_HUB_OFFLINE is unset), its column's rows joined by blank lines."""
    from urllib.parse import parse_qs, urlsplit

    url = urlsplit(source)
    repo, _, revision = (url.netloc + url.path).partition("@")
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    unknown = set(query) - {"split", "column", "config"}
    if unknown or not repo.count("/") == 1:
        raise SpecError(
            f"text source {source}: expected hf-dataset://org/name[@rev][?split=&column=&config=]"
            + (f" (unknown option {sorted(unknown)[0]!r})" if unknown else "")
        )
    import datasets
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo, repo_type="dataset", revision=revision or None, local_files_only=constants.HF_HUB_OFFLINE
        )
    except (LocalEntryNotFoundError, OSError) as err:
        raise SpecError(
            f"text source {source}: not in the local hub cache and not downloadable ({type(err).__name__})"
        ) from None
    split, column = query.get("split", "train"), query.get("column", "text")
    try:
        ds = datasets.load_dataset(local, query.get("config"), split=split)
    except ValueError as err:  # e.g. Unknown split "validation". Should be one of ['train'].
        raise SpecError(f"text source {source}: {str(err).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise SpecError(f"text source {source}: no column {column!r}; it has {', '.join(ds.column_names)}")
    return "\n\n".join(str(t) for t in ds[column] if t)


def _read_bytes(source: str) -> bytes:
    if source.startswith(HF_DATASET):
        return _hf_dataset_text(source).encode()
    if source.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        from farm import s3

        try:
            return bytes(s3.filesystem().cat(source.removeprefix("s3://")))
        except FileNotFoundError:
            raise SpecError(f"text source {source}: no such object") from None
        except (OSError, BotoCoreError, ClientError) as err:
            raise SpecError(
                f"text source {source}: cannot read from {s3.endpoint()} ({type(err).__name__}: {err})"
            ) from None
    path = Path(source)
    if not path.is_file():
        raise SpecError(f"text source {source}: no such file")
    return path.read_bytes()


def read_text(source: str) -> str:
    """A .txt file (local or s3://) as one document, a JSONL file's 'text' fields or a Hugging Face dataset's
    column joined by blank lines."""
    if source.startswith(MIX):
        return "\n\n".join(read_text(src) for src, _ in parts(source))
    return _parse(source, _read_bytes(source))


def read_identified(source: str) -> tuple[str, str]:
    """(the text of one source, the sha256 of the bytes it was read from): one read, so the identity a variant
    records is that of the text it was calibrated on, whatever happened to the file since planning."""
    raw = _read_bytes(source)
    return _parse(source, raw), hashlib.sha256(raw).hexdigest()


def mixture_sha256(shas: Sequence[str], weights: Sequence[float]) -> str:
    """A mixture's identity: its parts' contents and weights, in order."""
    blob = json.dumps([[sha, w] for sha, w in zip(shas, weights, strict=True)])
    return hashlib.sha256(blob.encode()).hexdigest()


def _parse(source: str, data: bytes) -> str:
    raw = data.decode("utf-8", errors="strict")
    path = Path(source)
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise SpecError(f"text source {source} line {n}: expected a JSON object with 'text'") from None
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise SpecError(f"text source {source}: empty")
    return raw


SAMPLE_CHARS = 65_536


@dataclass(frozen=True)
class TextIdentity:
    source: str
    sha256: str
    sample: str = field(default="", compare=False, repr=False)  # the text's start, for preflight's tokenizer check

    @classmethod
    def of(cls, source: str) -> TextIdentity:
        """Hash a text source after checking it is readable, UTF-8 and non-empty (so bad text fails in
        preflight, not in a worker minutes later)."""
        if source.startswith(MIX):  # a mixture's identity: its parts' contents and weights, in order
            each = [(cls.of(src), w) for src, w in parts(source)]
            sample = "\n".join(t.sample for t, _ in each)
            sha = mixture_sha256([t.sha256 for t, _ in each], [w for _, w in each])
            return cls(source=source, sha256=sha, sample=sample)
        try:
            text = read_text(source)
        except UnicodeDecodeError as err:
            raise SpecError(f"text source {source}: not UTF-8 (byte {err.start})") from None
        except OSError as err:
            raise SpecError(f"text source {source}: unreadable ({err.strerror or err})") from None
        remote = source.startswith(("s3://", HF_DATASET))
        sha = hashlib.sha256(_read_bytes(source)).hexdigest() if remote else file_sha256(source)
        return cls(source=source, sha256=sha, sample=text[:SAMPLE_CHARS])


def calibration_hash(content_sha256: str, num_samples: int, max_seq_length: int, seed: int) -> str:
    blob = json.dumps([content_sha256, num_samples, max_seq_length, seed])
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_windows(
    text: str, tokenizer: Any, num_samples: int, seq_len: int, seed: int, keep: Callable[[int], bool] | None = None
) -> list[list[int]]:
    """`num_samples` windows of exactly `seq_len` tokens starting at seeded random offsets of the text; with
    `keep`, only the windows whose index it accepts (a data-parallel rank's share: every offset is still drawn,
    so a window is the same whichever ranks there are). One batched tokenizer call for all of them."""
    rng = random.Random(seed)
    span = seq_len * CHARS_PER_TOKEN_BOUND
    if len(text) <= span:
        raise SpecError(f"calibration text has {len(text)} characters; {seq_len}-token samples need more")
    starts = []
    for i in range(num_samples):
        start = rng.randrange(0, len(text) - span)
        # start at a line boundary so a sample does not begin mid-word
        nl = text.find("\n", start, start + 200)
        if keep is None or keep(i):
            starts.append(nl + 1 if nl >= 0 else start)
    if not starts:
        return []
    encoded = tokenizer([text[s : s + span] for s in starts], add_special_tokens=False)["input_ids"]
    samples = [list(ids[:seq_len]) for ids in encoded]
    if any(len(ids) < seq_len for ids in samples):
        raise SpecError(f"calibration text too sparse for {seq_len}-token samples")
    return samples


def heldout_windows(text: str, tokenizer: Any, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Non-overlapping windows from the start of the held-out text, at most `max_tokens` tokens in all."""
    ids = tokenizer(text[: max_tokens * CHARS_PER_TOKEN_BOUND], add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not windows:
        raise SpecError(f"held-out text has {len(ids)} tokens; one {seq_len}-token window needs more")
    return windows


def allocate(weights: list[float], n: int) -> list[int]:
    """n samples split in proportion to weights (largest remainder: sums to n, deterministic)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


def draw(
    source: str,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    shares: Sequence[int] | None = None,
    expect_sha256: str | None = None,
) -> list[list[int]]:
    """The calibration windows of a source or a mixture: each part contributes its share, drawn with its own
    seed (seed + part index), in the mixture's order. Same inputs, same windows. With `world` > 1 only the
    windows `rank::world` of that list: the disjoint shares of data-parallel ranks, each tokenizing its own;
    with `shares` (samples per rank), rank r's `shares[r]` windows, interleaved over the draw (`interleave`).
    `expect_sha256`: the identity planned for the source (`TextIdentity`); text that no longer has it raises
    InputChanged rather than calibrating a variant whose recorded identity would not be the text it used."""
    if shares is not None and (len(shares) != world or sum(shares) != num_samples):
        raise ValueError(f"shares {list(shares)} must give each of {world} ranks a count summing to {num_samples}")
    ranks = interleave(shares) if shares is not None else None
    items = parts(source)
    counts = allocate([w for _, w in items], num_samples)
    windows: list[list[int]] = []
    offset = 0  # the index of the part's first window in the whole draw
    texts = [
        read_identified(src) if n or expect_sha256 else ("", "") for (src, _), n in zip(items, counts, strict=True)
    ]
    if expect_sha256:
        sha = (
            texts[0][1] if not source.startswith(MIX) else mixture_sha256([t[1] for t in texts], [w for _, w in items])
        )
        if sha != expect_sha256:
            raise InputChanged(
                f"calibration text {source} changed since the job was planned (sha256 {expect_sha256[:12]} planned, "
                f"{sha[:12]} read): this variant was not built; re-run the job to plan it on the new text"
            )
    for i, ((_src, _), n, (text, _sha)) in enumerate(zip(items, counts, texts, strict=True)):
        if n:
            windows += sample_windows(
                text,
                tokenizer,
                n,
                seq_len,
                seed + i,
                None if world == 1 else _share(offset, rank, world, ranks),
            )
        offset += n
    return windows


def _share(first: int, rank: int, world: int, ranks: list[int] | None = None) -> Callable[[int], bool]:
    """Which of a part's windows (numbered from the draw's `first`) are `rank`'s: every world-th of the draw,
    or those `ranks` (the draw's window -> rank) gives it."""
    if ranks is not None:
        return lambda j: ranks[first + j] == rank
    return lambda j: (first + j) % world == rank


def interleave(counts: Sequence[int]) -> list[int]:
    """The rank of each window of the draw, interleaved in proportion to `counts` (equal counts: round
    robin), so every rank's share spans the whole draw (and each part of a mixture)."""
    taken = [0] * len(counts)
    ranks = []
    for _ in range(sum(counts)):
        r = min((r for r in range(len(counts)) if taken[r] < counts[r]), key=lambda r: ((taken[r] + 1) / counts[r], r))
        taken[r] += 1
        ranks.append(r)
    return ranks


def token_stats(windows: list[list[int]]) -> tuple[int, set[int], int]:
    """(tokens, the distinct token ids, windows): what `diversity_of` needs, and what ranks' shares sum to."""
    return sum(len(w) for w in windows), {t for w in windows for t in w}, len(windows)


def summed_stats(shares: list[tuple[int, set[int], int]]) -> tuple[int, set[int], int]:
    """The `token_stats` of a whole draw from those of its ranks' disjoint shares."""
    return sum(s[0] for s in shares), set().union(*(s[1] for s in shares)), sum(s[2] for s in shares)


def diversity_of(source: str, tokens: int, unique: set[int], windows: int) -> dict[str, Any]:
    """A short report on what calibration saw (`token_stats` of its windows, summed over ranks): tokens,
    unique-token ratio, per-part shares, and a histogram of the source documents' lengths in words (paragraphs
    of text, records of JSONL)."""
    docs = [d for src, _ in parts(source) for d in read_text(src).split("\n\n") if d.strip()]
    lengths = [len(d.split()) for d in docs]
    edges = [0, 10, 50, 200, 1000, 10**9]
    hist = {
        f"{a}-{b - 1 if b < 10**9 else 'inf'}": sum(a <= n < b for n in lengths) for a, b in itertools.pairwise(edges)
    }
    return {
        "tokens": tokens,
        "unique_tokens": len(unique),
        "unique_token_ratio": len(unique) / max(1, tokens),
        "windows": windows,
        "parts": [{"source": src, "weight": w} for src, w in parts(source)],
        "documents": len(docs),
        "doc_words_histogram": hist,
    }
