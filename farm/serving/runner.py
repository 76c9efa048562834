"""The serving check on the worker: build the engine's request, run the engine in its own process and
environment on this worker's GPU, and read its result back as one typed `ServingResult`.

Nothing here imports the engine: `vllm_engine.py` runs under the interpreter and PYTHONPATH the spec names
(`evaluation.serving.python` / `pythonpath`), in a new process group that is ended whatever happens, so an
engine that hangs or leaves children behind never outlives the check. A failure is one line in the result
(`error`), never an exception: the variant keeps its other records and the job goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.serving import measure
from farm.spec import ServingSpec

ENGINE_SCRIPT = Path(__file__).with_name("vllm_engine.py")
LOG_TAIL_LINES = 60
# The engine process's own settings: no usage report leaves the machine; farm's weight probe is a function
# sent to vLLM's worker, which vLLM only accepts with insecure (pickle) serialization allowed on its local IPC.
ENGINE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class ServingResult:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # names under farm.
    document: dict[str, Any] = field(default_factory=dict)  # checks/serving.json
    error: str | None = None


def gpu_utilization(spec: ServingSpec, num_gpus: float) -> float:
    """The engine's share of the card: the spec's, or 0.85 of the variant's GPU share (vLLM reserves the share
    of the whole card's memory, so packed variants each ask for their part)."""
    if spec.gpu_memory_utilization is not None:
        return spec.gpu_memory_utilization
    return round(0.85 * min(1.0, num_gpus), 4)


def engine_env(spec: ServingSpec) -> dict[str, str]:
    """The engine process's environment: the worker's, the spec's directories first on PYTHONPATH, farm's
    engine settings, then the spec's own variables."""
    env = dict(os.environ)
    path = [*spec.pythonpath, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env | ENGINE_ENV | {"FARM_PARENT_PID": str(os.getpid())} | spec.env


def probe(spec: ServingSpec, timeout: float = 60) -> tuple[str | None, str]:
    """(None, engine version) when the engine can be imported where the spec says, else (one line, "").
    Reads the package's metadata and spec only (no CUDA, no import of the engine): seconds, not a minute."""
    code = (
        "import importlib.metadata as m, importlib.util as u, sys\n"
        "if u.find_spec('vllm') is None: sys.exit('vllm is not importable')\n"
        "print(m.version('vllm'))"
    )
    python = spec.python or sys.executable
    try:
        done = subprocess.run(
            [python, "-c", code], env=engine_env(spec), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return f"evaluation.serving.python: {python} does not exist", ""
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"evaluation.serving: {python} could not be run ({type(err).__name__})", ""
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        where = f"{python}" + (f" with PYTHONPATH {os.pathsep.join(spec.pythonpath)}" if spec.pythonpath else "")
        return f"evaluation.serving: vLLM cannot be imported by {where} ({why})", ""
    return None, done.stdout.strip()


def prompt_offsets(corpus_len: int, input_tokens: int, n: int, rng: random.Random) -> list[int]:
    """n window starts in a corpus of corpus_len tokens, distinct while the corpus has room for them."""
    room = corpus_len - input_tokens + 1
    if room <= 0:
        raise ValueError(f"the prompt text has {corpus_len} tokens; a {input_tokens}-token prompt needs more")
    return rng.sample(range(room), n) if n <= room else [rng.randrange(room) for _ in range(n)]


def build_request(
    model_dir: str, spec: ServingSpec, corpus: list[int], num_gpus: float, trust_remote_code: bool
) -> dict[str, Any]:
    """The engine's input: one seeded draw of prompt windows per (shape, level), the same for a base and each of
    its variants (same seed, same text, same tokenizer), and distinct across levels so no level finds another's
    prompts in the prefix cache."""
    shapes = spec.resolved_shapes()
    longest = max(s.input_tokens for s in shapes)
    if len(corpus) < longest + 1:  # a short text is tiled: windows then repeat, which the seed keeps fixed
        corpus = corpus * (-(-(longest + 1) // max(len(corpus), 1)))
    rng = random.Random(spec.seed)
    levels = []
    for shape in shapes:
        for c in spec.concurrency:
            n = spec.requests_per_level or max(8, 2 * c)
            levels.append(
                {
                    "shape": shape.name,
                    "concurrency": c,
                    "input_tokens": shape.input_tokens,
                    "output_tokens": shape.output_tokens,
                    "offsets": prompt_offsets(len(corpus), shape.input_tokens, n, rng),
                }
            )
    first = shapes[0]
    warm = prompt_offsets(len(corpus), first.input_tokens, spec.warmup_requests, rng) if spec.warmup_requests else []
    greedy_len = min(first.input_tokens, 128)
    greedy = (
        prompt_offsets(len(corpus), greedy_len, spec.greedy_prompts, random.Random(spec.seed + 1))
        if spec.greedy_prompts
        else []
    )
    return {
        "model": model_dir,
        "trust_remote_code": trust_remote_code,
        "seed": spec.seed,
        "gpu_memory_utilization": gpu_utilization(spec, num_gpus),
        "max_model_len": spec.model_len(),
        "engine_args": dict(spec.engine_args),
        "corpus": corpus,
        "levels": levels,
        "warmup": {"offsets": warm, "input_tokens": first.input_tokens, "output_tokens": min(first.output_tokens, 16)},
        "greedy": {"offsets": greedy, "input_tokens": greedy_len, "output_tokens": spec.greedy_tokens},
    }


_PROC_PREFIX = re.compile(r"^\((?:EngineCore|Worker|APIServer)[^)]*\)\s*")
GENERIC = ("See root cause above", "Engine core initialization failed")


def _exception_lines(log: str) -> list[str]:
    out = []
    for raw in log.splitlines():
        ln = _PROC_PREFIX.sub("", raw.strip())
        head = ln.split(":", 1)[0]
        if ln and head.endswith(("Error", "Exception", "Exit", "Interrupt")) and " " not in head and ":" in ln:
            out.append(ln)
    return out


def last_error_line(log: str) -> str:
    """The line of an engine's log that says why it stopped: the last exception that names a cause (vLLM's
    engine-core process logs the cause; the front end then raises a generic "see root cause above"), else
    the last line."""
    found = _exception_lines(log)
    specific = [ln for ln in found if not any(g in ln for g in GENERIC)]
    if specific or found:
        return (specific or found)[-1][:400]
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "no output"


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the engine's own children (vLLM's engine core) go with it
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_engine(request: dict[str, Any], spec: ServingSpec, context: int) -> ServingResult:
    """Run the engine process on `request` and read what it measured."""
    tags: dict[str, str] = {measure.TAG_ENGINE: str(spec.engine)}
    with tempfile.TemporaryDirectory(prefix="farm-serve-") as tmp:
        req_path, res_path, log_path = Path(tmp, "request.json"), Path(tmp, "result.json"), Path(tmp, "engine.log")
        req_path.write_text(json.dumps(request))
        cmd = [spec.python or sys.executable, str(ENGINE_SCRIPT), str(req_path), str(res_path)]
        t0 = time.perf_counter()
        with log_path.open("wb") as log:
            try:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=engine_env(spec), cwd=tmp, start_new_session=True
                )
            except OSError as err:
                return ServingResult(tags=tags, error=f"serving engine could not start: {cmd[0]}: {err.strerror}")
            timed_out = False
            try:
                proc.wait(timeout=spec.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _end_group(proc)
        log_text = log_path.read_text(errors="replace")
        tail = log_text.splitlines()[-LOG_TAIL_LINES:]
        if timed_out:
            return ServingResult(
                tags=tags,
                document={"log_tail": tail},
                error=f"serving engine did not finish within {spec.timeout_s:g} s "
                f"(evaluation.serving.timeout_s); last line: {last_error_line(log_text)}",
            )
        raw = json.loads(res_path.read_text()) if res_path.exists() else None
    if raw is None or raw.get("error"):
        why = raw["error"] if raw else f"exit {proc.returncode}: {last_error_line(log_text)}"
        if any(g in why for g in GENERIC):  # the engine core's own reason, from the log
            why = last_error_line(log_text)
        return ServingResult(tags=tags, document={"log_tail": tail}, error=f"{spec.engine}: {why}")
    metrics, doc = measure.summarize(raw, context, log_text)
    metrics[measure.GPU_UTILIZATION] = float(request["gpu_memory_utilization"])
    tags |= {measure.TAG_VERSION: str(raw.get("version")), measure.TAG_QUANTIZATION: doc.get("quantization") or ""}
    doc |= {"seconds_check": time.perf_counter() - t0, "gpu_memory_utilization": request["gpu_memory_utilization"]}
    return ServingResult(metrics, tags, doc)


def serve(
    model_dir: str, spec: ServingSpec, text: str, tokenizer: Any, num_gpus: float, trust_remote_code: bool = False
) -> ServingResult:
    """Measure the checkpoint at `model_dir` as the engine serves it; prompts are windows of `text` (the job's
    held-out text) in the model's own tokens."""
    corpus = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not corpus:
        return ServingResult(
            tags={measure.TAG_ENGINE: spec.engine},
            error="serving: the held-out text gives no tokens with this model's tokenizer",
        )
    context = spec.context or max(s.input_tokens + s.output_tokens for s in spec.resolved_shapes())
    return run_engine(build_request(model_dir, spec, corpus, num_gpus, trust_remote_code), spec, context)
