"""The CLI: bad input is one line and exit 2 with nothing written; the CLI and driver never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import tiny_spec, write_spec


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farm: error:") and needle in lines[0], res.stderr


def test_bad_inputs(fixture_paths: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = tiny_spec(fixture_paths, str(out))
    cases = {
        "unknown method": ({**good, "methods": [{"method": "nf5"}]}, "available"),
        "bad group size": ({**good, "methods": [{"method": "gptq", "group_size": 96}]}, "group_size=96"),
        "missing model": ({**good, "models": [{"source": str(tmp_path / "nope")}]}, "no such directory"),
        "missing calibration": ({**good, "calibration": {"source": str(tmp_path / "c.txt")}}, "no such file"),
        "search without validation": (
            {**good, "methods": [{"method": "search", "budget": 1, "candidates": [{"method": "fp8"}]}]},
            "add a `validation:` section",
        ),
        "validation is the held-out text": (
            {**good, "validation": {"source": good["evaluation"]["perplexity"]["source"]}},
            "the validation text is the held-out text",
        ),
        "validation is the calibration text": (
            {**good, "validation": {"source": good["calibration"]["source"]}},
            "the validation text is the calibration text",
        ),
    }
    for name, (spec, needle) in cases.items():
        p = write_spec(tmp_path / f"{name.replace(' ', '_')}.yaml", spec)
        assert_one_line_error(run_cli("run", str(p), cwd=tmp_path), needle)
    assert_one_line_error(run_cli("run", str(tmp_path / "absent.yaml"), cwd=tmp_path), "cannot read spec")
    assert not out.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_pickle_only_checkpoint_refused(tmp_path: Path, fixture_paths: dict) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    spec = write_spec(
        tmp_path / "s.yaml", {**tiny_spec(fixture_paths, str(tmp_path / "o")), "models": [{"source": str(model)}]}
    )
    assert_one_line_error(run_cli("plan", str(spec), cwd=tmp_path), "pickle")


def test_cli_and_planning_import_no_torch(fixture_paths: dict, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(fixture_paths, str(tmp_path / "o")))
    code = (
        "import sys, farm.cli, farm.runtime.driver, farm.tracking.mlflow_store\n"
        f"rc = farm.cli.main(['plan', {str(spec)!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'llmcompressor') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tiny-llama/gptq-w4a16-g64" in res.stdout
    assert yaml.safe_load(spec.read_text())["name"] == "tiny"


def test_pickle_checkpoint_accepted_only_when_allowed(tmp_path: Path, fixture_paths: dict) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(fixture_paths["tiny-llama"], model, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(fixture_paths["tiny-llama"] / "model.safetensors"), model / "pytorch_model.bin")
    base = {**tiny_spec(fixture_paths, str(tmp_path / "o"))}
    refused = write_spec(tmp_path / "refused.yaml", {**base, "models": [{"source": str(model)}]})
    assert_one_line_error(run_cli("plan", str(refused), cwd=tmp_path), "allow_pickle")
    allowed = write_spec(tmp_path / "allowed.yaml", {**base, "models": [{"source": str(model), "allow_pickle": True}]})
    res = run_cli("plan", str(allowed), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
