"""Data shipped with farm for the evaluation checks: a refusal suite and a toxicity lexicon."""

from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
SAFETY_SUITE = SUITE_DIR / "safety.jsonl"
TOXICITY_LEXICON = SUITE_DIR / "toxicity_lexicon.txt"
