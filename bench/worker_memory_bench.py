"""GPU memory a reused worker keeps after quantizing: variants made one after another in one process (as a
Ray worker makes them), the caching allocator's reserved bytes before and after farm releases device memory.
What stays is what the next variant, a packed neighbour or the serving engine finds occupied.

  python bench/worker_memory_bench.py --tokenizer TOKENIZER_DIR --text CALIBRATION.txt --methods gptq,fp8,gptq
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_bench import SHAPES, build_model

METHODS = {"gptq": {"method": "gptq", "group_size": 128}, "fp8": {"method": "fp8"}, "int8": {"method": "int8"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--methods", default="gptq,fp8,gptq")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/farm-worker-memory"))
    args = ap.parse_args()

    import torch

    from farm.methods import build_method
    from farm.runtime.workers import release_device_memory
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    model = build_model(args.shape, 0, args.tokenizer, args.work)
    release_device_memory()
    print("| # | method | seconds | reserved before release GiB | reserved after GiB | allocated after GiB |")
    print("|---|---|---|---|---|---|")
    for i, name in enumerate(args.methods.split(",")):
        t0 = time.perf_counter()
        quantize(
            QuantizeRequest(
                model_dir=str(model),
                method=build_method(METHODS[name]),
                calibration=CalibrationDraw(str(args.text), args.samples, args.seq, 0),
                out_dir=str(args.work / f"q{i}-{name}"),
            )
        )
        before = torch.cuda.memory_reserved()
        release_device_memory()
        gib = 2**30
        print(
            f"| {i + 1} | {name} | {time.perf_counter() - t0:.1f} | {before / gib:.2f} | "
            f"{torch.cuda.memory_reserved() / gib:.3f} | {torch.cuda.memory_allocated() / gib:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
