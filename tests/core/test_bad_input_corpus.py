"""A corpus of malformed and hostile job specs: each gets one line naming the problem, exit 2, and nothing is
submitted or written (no output root, no MLflow store, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.cli import main
from tests.conftest import tiny_spec


def _with(base: dict, path: tuple, value: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


_DELETE = object()

# (case id, change to the good spec as (path, value), or raw bytes, expected text in the error line)
CASES: list[tuple[str, object, str]] = [
    ("unknown top-level key", (("nmae",), "x"), "nmae: unknown field"),
    ("unknown method field", (("methods", 0, "group_sise"), 64), "group_sise: unknown field"),
    ("unknown method", (("methods", 0), {"method": "nf5"}), "unknown method 'nf5'"),
    ("method missing", (("methods", 0), {"group_size": 64}), "methods.0.method"),
    ("wrong type samples", (("calibration", "num_samples"), "many"), "calibration.num_samples"),
    ("negative samples", (("calibration", "num_samples"), -5), "calibration.num_samples"),
    ("zero seq len", (("calibration", "max_seq_length"), 0), "calibration.max_seq_length"),
    ("huge samples", (("calibration", "num_samples"), 10**12), "calibration.num_samples"),
    ("huge seq len", (("calibration", "max_seq_length"), 2**40), "calibration.max_seq_length"),
    ("negative group size", (("methods", 0, "group_size"), -64), "group_size"),
    ("impossible group size", (("methods", 0, "group_size"), 96), "group_size=96 does not divide"),
    ("bad scheme", (("methods", 0, "scheme"), "W3A16"), "scheme"),
    ("smoothing out of range", (("methods", 3, "smoothing_strength"), 1.5), "smoothing_strength"),
    ("no models key", (("models",), _DELETE), "models: Field required"),
    ("empty models", (("models",), []), "models"),
    ("models not a list", (("models",), "tiny"), "models"),
    ("missing model dir", (("models", 0, "source"), "/nonexistent/model"), "no such directory"),
    ("empty model source", (("models", 0, "source"), "  "), "models.0.source"),
    ("unsupported scheme", (("models", 0, "source"), "ftp://host/model"), "unsupported scheme"),
    ("path traversal job name", (("name",), "../../etc/passwd"), "name"),
    ("path traversal model name", (("models", 0, "name"), "../escape"), "models.0.name"),
    ("path traversal method label", (("methods", 0, "name"), "../../x"), "methods.0.gptq.name"),
    ("slash in job name", (("name",), "a/b"), "name"),
    ("missing calibration file", (("calibration", "source"), "/nonexistent.txt"), "no such file"),
    ("negative gpus", (("resources",), {"num_gpus": -1}), "resources.num_gpus"),
    ("zero memory", (("resources",), {"memory_gb": 0}), "resources.memory_gb"),
    ("huge gpus", (("resources",), {"num_gpus": 10**6}), "resources.num_gpus"),
    ("empty experiment", (("tracking",), {"experiment": ""}), "tracking.experiment"),
    ("bad registry prefix", (("tracking",), {"registered_model_prefix": "a b"}), "registered_model_prefix"),
    ("duplicate methods", (("methods",), [{"method": "fp8"}, {"method": "fp8"}]), "duplicate"),
    ("eval window zero", (("evaluation", "perplexity", "seq_len"), 0), "evaluation.perplexity.seq_len"),
    ("generation too long", (("evaluation", "generation"), {"max_new_tokens": 10**9}), "max_new_tokens"),
    ("list as number", (("calibration", "seed"), [1, 2]), "calibration.seed"),
    ("yaml alias bomb", b'a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\nd: [*c,*c]\n', "aliases"),
    ("non utf-8", b"name: caf\xe9\n", "not UTF-8"),
    ("invalid yaml", b"name: [unclosed\n", "invalid YAML"),
    ("top-level list", b"- name: x\n", "mapping"),
    ("empty file", b"", "mapping"),
    ("python object tag", b"name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("too large", b"name: x\n" + b"#" * 1_000_001, "limit"),
    # strict types: nothing is coerced
    ("string as boolean", (("models", 0, "trust_remote_code"), "yes"), "models.0.trust_remote_code"),
    ("number as boolean", (("tracking",), {"log_model": 1}), "tracking.log_model"),
    ("boolean as integer", (("calibration", "num_samples"), True), "calibration.num_samples"),
    ("numeric string as integer", (("calibration", "seed"), "7"), "calibration.seed"),
    ("float as integer", (("calibration", "max_seq_length"), 64.5), "calibration.max_seq_length"),
    ("boolean as number", (("resources",), {"num_gpus": True}), "resources.num_gpus"),
    ("number as string", (("models", 0, "name"), 5), "models.0.name"),
    ("boolean method field", (("methods", 0, "group_size"), False), "group_size"),
    # locations and URIs, checked as written
    ("tracking uri not a uri", (("tracking",), {"uri": "not a uri"}), "tracking.uri"),
    ("tracking uri unknown scheme", (("tracking",), {"uri": "ftp://host/x"}), "tracking.uri"),
    ("tracking uri no host", (("tracking",), {"uri": "http://"}), "names no host"),
    ("tracking uri bad port", (("tracking",), {"uri": "http://localhost:abc"}), "port"),
    ("tracking uri sqlite no path", (("tracking",), {"uri": "sqlite://"}), "tracking.uri"),
    ("s3 model no bucket", (("models", 0, "source"), "s3://"), "names no bucket"),
    ("s3 model empty bucket", (("models", 0, "source"), "s3:///models/x"), "names no bucket"),
    ("s3 model bad bucket", (("models", 0, "source"), "s3://My_Bucket/x"), "not an S3 bucket name"),
    ("s3 empty segment", (("models", 0, "source"), "s3://bucket//x"), "empty path segment"),
    ("s3 calibration no bucket", (("calibration", "source"), "s3:///c.txt"), "calibration.source"),
    ("s3 output no bucket", (("output",), {"root": "s3://"}), "output.root"),
    ("s3 heldout bad bucket", (("evaluation", "perplexity", "source"), "s3://a/x.txt"), "perplexity.source"),
    ("s3 missing slashes", (("models", 0, "source"), "s3:bucket/x"), "expected s3://"),
    ("hf empty repo", (("models", 0, "source"), "hf://"), "not a hub repository"),
    ("hf empty revision", (("models", 0, "source"), "hf://org/name@"), "empty revision"),
    # YAML that parses into something other than what was written
    ("duplicate key", b"name: a\nname: b\n", "given twice"),
    ("deep nesting", b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested deeper"),
    ("deep mappings", b"a: " + b"{b: " * 200 + b"1" + b"}" * 200 + b"\n", "nested deeper"),
]


@pytest.mark.parametrize(("case", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_one_line_exit_2_nothing_written(
    case: str, change: object, expected: str, fixture_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    good = tiny_spec(fixture_paths, str(out))
    spec = tmp_path / "job.yaml"
    if isinstance(change, bytes):
        spec.write_bytes(change)
    else:
        path, value = change
        spec.write_text(yaml.safe_dump(_with(good, path, value)))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("farm: error:"), err
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to the spec
    assert not out.exists()


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_empty_calibration_text_fails_in_preflight(
    fixture_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(_with(tiny_spec(fixture_paths, str(tmp_path / "o")), ("calibration", "source"), str(empty)))
    )
    assert main(["run", str(spec)]) == 2
    assert "empty" in capsys.readouterr().err


def _model_copy(src: Path, into: Path) -> Path:
    """A copy of a fixture model whose files the case may break (weights linked: they are large and untouched)."""
    into.mkdir()
    for f in src.iterdir():
        (into / f.name).write_bytes(f.read_bytes()) if f.suffix != ".safetensors" else (into / f.name).symlink_to(f)
    return into


def _truncate(d: Path) -> None:
    shard = next(d.glob("*.safetensors"))
    data = shard.resolve().read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])


def _garbage_header(d: Path) -> None:
    shard = next(d.glob("*.safetensors"))
    data = shard.resolve().read_bytes()
    shard.unlink()
    n = int.from_bytes(data[:8], "little")
    shard.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def _not_safetensors(d: Path) -> None:
    shard = next(d.glob("*.safetensors"))
    shard.unlink()
    shard.write_bytes(b"PK\x03\x04" + b"\x00" * 4096)  # a zip (a torch pickle) renamed


def _empty_tokenizer(d: Path) -> None:
    """A tokenizer whose normalizer deletes every character: every text is no tokens."""
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Replace", "pattern": {"Regex": "[\\s\\S]"}, "content": ""}
    (d / "tokenizer.json").write_text(json.dumps(tok))


def _broken_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')


FILE_CASES = [
    ("truncated shard", _truncate, "truncated"),
    ("corrupt header", _garbage_header, "header is not JSON"),
    ("not safetensors", _not_safetensors, "does not fit the file"),
    ("tokenizer gives no tokens", _empty_tokenizer, "tokenizer (tokenizer.json) turns the calibration text"),
    ("unreadable tokenizer", _broken_tokenizer, "tokenizer.json cannot be read"),
]


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize(("case", "damage", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_broken_model_files_fail_in_preflight(
    case: str,
    damage: Any,
    expected: str,
    command: str,
    fixture_paths: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """`plan` runs the same preflight as `run`: what one refuses, the other does too, before anything is written."""
    model = _model_copy(fixture_paths["tiny-llama"], tmp_path / "model")
    damage(model)
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_with(tiny_spec(fixture_paths, str(out)), ("models", 0, "source"), str(model))))
    assert main([command, str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("under", [False, True])
def test_output_root_that_is_a_file(
    command: str, under: bool, fixture_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("precious")
    root = blocker / "sub" if under else blocker
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(fixture_paths, str(root))))
    assert main([command, str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a file, not a directory" in err, err
    assert blocker.read_text() == "precious"
