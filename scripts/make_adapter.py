"""Train the small LoRA adapter farm ships for the QLoRA path: SmolLM2-135M-Instruct, a few dozen steps of
next-token loss on the Shakespeare calibration text (CPU, minutes). The held-out play is never seen.

    python scripts/make_adapter.py [--out jobs/adapters/smollm2-shakespeare] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from farm import fixtures
from farm.stages.checks.adapters import train_lora


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "jobs/adapters/smollm2-shakespeare"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    paths = fixtures.ensure_all()
    info = train_lora(str(paths["smollm2"]), str(paths["shakespeare"] / "calibration.txt"), args.out,
                      steps=args.steps, rank=args.rank)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
