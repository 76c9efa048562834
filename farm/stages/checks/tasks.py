"""Task accuracy through lm-eval-harness, offline: local YAML tasks over local JSONL, evaluated on the model
already loaded for the other checks (lm-eval's HFLM wraps it; nothing is downloaded)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from farm.evalsuite import SUITE_DIR
from farm.spec import TasksSpec

TASKS_DIR = SUITE_DIR / "tasks"


def _task_dir(spec: TasksSpec, work: Path) -> Path:
    """farm's task YAMLs with their data directory filled in (lm-eval wants concrete data_files paths)."""
    for yaml_file in TASKS_DIR.glob("*.yaml"):
        (work / yaml_file.name).write_text(yaml_file.read_text().replace("{data_dir}", spec.data_dir))
    return work


def primary(metrics: dict[str, Any]) -> dict[str, float]:
    """`task_<name>_<metric>` for every numeric metric lm-eval reports (stderr left out)."""
    out = {}
    for task, values in metrics.items():
        for key, value in values.items():
            if isinstance(value, int | float) and "stderr" not in key and key not in {"alias", "sample_len"}:
                metric, _, filt = key.partition(",")
                suffix = "" if filt in {"", "none"} else f"_{filt}"
                out[f"task_{task}_{metric}{suffix}"] = float(value)
    return out


def accuracy(model: Any, tokenizer: Any, spec: TasksSpec, device: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="farm-tasks-") as tmp:
        include = [str(_task_dir(spec, Path(tmp)))] + ([spec.include_path] if spec.include_path else [])
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(spec.names),
            limit=spec.limit,
            task_manager=TaskManager(include_path=include),
            log_samples=False,
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
        )
    return {"metrics": primary(results["results"]), "results": results["results"]}
