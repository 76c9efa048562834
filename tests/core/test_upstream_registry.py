"""Every replacement of upstream internals is listed with its versions, switch and test; on an unchecked
upstream version or a changed signature it is refused loudly and upstream's code runs. Torch-free."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from farm.stages.llmc import registry, swap

ROOT = Path(__file__).resolve().parents[2]


def test_each_entry_names_a_real_module_a_switch_and_an_existing_test() -> None:
    assert len({r.key for r in registry.REPLACEMENTS}) == len(registry.REPLACEMENTS)
    for r in registry.REPLACEMENTS:
        assert (ROOT / "farm" / "stages" / (r.farm.replace(".", "/") + ".py")).exists(), r.farm
        assert r.checked and r.switch and r.what
        for test in r.test.split(", "):
            assert (ROOT / test.split("::")[0]).exists(), test


def test_a_replacement_not_in_the_table_is_a_bug() -> None:
    mod = types.ModuleType("llmcompressor.unlisted")
    mod.f = lambda: 1  # type: ignore[attr-defined]
    with pytest.raises(KeyError, match="not listed"), swap.swapped(mod, "f", lambda o: o, "x"):
        pass


def _upstream(name: str, params: str) -> types.ModuleType:
    """A module under the replaced function's real name (the guard keys on names), with a function whose
    parameters are `params`."""
    mod = types.ModuleType("llmcompressor.pipelines.sequential.pipeline")
    ns: dict = {}
    exec(f"def {name}({params}): return 'upstream'", ns)
    setattr(mod, name, ns[name])
    return mod


def test_an_unchecked_version_leaves_upstream_in_place(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(registry, "installed", lambda package: "99.0")
    monkeypatch.delenv(registry.UNCHECKED_ENV, raising=False)
    mod = _upstream("trace_subgraphs", "model, sample_input, sequential_targets, ignore, targets_per_subgraph")
    with caplog.at_level(logging.WARNING), swap.swapped(mod, "trace_subgraphs", lambda o: lambda *a: "farm", "x") as on:
        assert not on and mod.trace_subgraphs(1, 2, 3, 4, 5) == "upstream"
    assert "llmcompressor 99.0 is not a version" in caplog.text
    monkeypatch.setenv(registry.UNCHECKED_ENV, "1")  # checking a new release: apply it anyway
    with swap.swapped(mod, "trace_subgraphs", lambda o: lambda *a: "farm", "x") as on:
        assert on and mod.trace_subgraphs() == "farm"
    assert mod.trace_subgraphs(1, 2, 3, 4, 5) == "upstream"


def test_a_changed_signature_leaves_upstream_in_place(caplog) -> None:
    mod = _upstream("trace_subgraphs", "model, sample_input, sequential_targets")  # upstream dropped two
    with caplog.at_level(logging.WARNING), swap.swapped(mod, "trace_subgraphs", lambda o: lambda *a: "farm", "x") as on:
        assert not on
    assert "no longer takes ignore, targets_per_subgraph" in caplog.text


def test_design_doc_holds_the_generated_table() -> None:
    assert registry.markdown() in (ROOT / "docs" / "DESIGN.md").read_text()


def test_farms_own_objects_need_no_listing() -> None:
    """The swap mechanism also times and replaces farm's own functions (and tests' objects): not upstream."""
    mod = types.ModuleType("farm.something")
    mod.f = lambda: 1  # type: ignore[attr-defined]
    with swap.swapped(mod, "f", lambda o: lambda: 2, "x") as on:
        assert on and mod.f() == 2
