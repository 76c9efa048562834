"""Calibration and evaluation text: loading, deterministic sampling by seed, and content hashes.

A calibration identity is (content hash of the source, samples, sequence length, seed): a variant calibrated
on different text or a different draw is a different variant.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import SpecError

CHARS_PER_TOKEN_BOUND = 8  # generous: a window of this many chars per token always tokenizes to enough tokens


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_text(source: str) -> str:
    """A .txt file as one document, or a JSONL file's 'text' fields joined by blank lines."""
    path = Path(source)
    if not path.is_file():
        raise SpecError(f"text source {source}: no such file")
    raw = path.read_text(encoding="utf-8", errors="strict")
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


@dataclass(frozen=True)
class TextIdentity:
    source: str
    sha256: str

    @classmethod
    def of(cls, source: str) -> TextIdentity:
        """Hash a text source after checking it is readable, UTF-8 and non-empty (so bad text fails in
        preflight, not in a worker minutes later)."""
        try:
            read_text(source)
        except UnicodeDecodeError as err:
            raise SpecError(f"text source {source}: not UTF-8 (byte {err.start})") from None
        except OSError as err:
            raise SpecError(f"text source {source}: unreadable ({err.strerror or err})") from None
        return cls(source=source, sha256=file_sha256(source))


def calibration_hash(content_sha256: str, num_samples: int, max_seq_length: int, seed: int) -> str:
    blob = json.dumps([content_sha256, num_samples, max_seq_length, seed])
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_windows(text: str, tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """`num_samples` windows of exactly `seq_len` tokens starting at seeded random offsets of the text."""
    rng = random.Random(seed)
    span = seq_len * CHARS_PER_TOKEN_BOUND
    if len(text) <= span:
        raise SpecError(f"calibration text has {len(text)} characters; {seq_len}-token samples need more")
    samples = []
    for _ in range(num_samples):
        start = rng.randrange(0, len(text) - span)
        # start at a line boundary so a sample does not begin mid-word
        nl = text.find("\n", start, start + 200)
        start = nl + 1 if nl >= 0 else start
        ids = tokenizer(text[start : start + span], add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) < seq_len:
            raise SpecError(f"calibration text too sparse for {seq_len}-token samples")
        samples.append(ids)
    return samples


def heldout_windows(text: str, tokenizer: Any, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Non-overlapping windows from the start of the held-out text, at most `max_tokens` tokens in all."""
    ids = tokenizer(text[: max_tokens * CHARS_PER_TOKEN_BOUND], add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not windows:
        raise SpecError(f"held-out text has {len(ids)} tokens; one {seq_len}-token window needs more")
    return windows
