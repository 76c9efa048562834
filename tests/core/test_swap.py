"""farm's speed-ups hook into llm-compressor through one scoped, counted swap (stages/llmc/swap.py): covered calls go
to the replacement (positional or keyword, as upstream calls them), the rest to the original, and the original
is back after the block, also on error; a function upstream no longer has leaves the speed-up off."""

import time
import types

import pytest

from farm.stages.llmc.swap import taken_over, timed


def upstream() -> types.SimpleNamespace:
    return types.SimpleNamespace(__name__="upstream", solve=lambda weights, hessians, scale=1: ("original", scale))


def test_covered_calls_go_to_the_replacement_and_are_counted() -> None:
    mod = upstream()
    original = mod.solve
    with taken_over(
        mod,
        "solve",
        lambda weights, hessians, **_: weights > 0,
        lambda weights, hessians, scale=1: ("ours", scale),
        "a speed-up",
        "took over {n}",
        count=lambda weights, *_, **__: weights,
    ) as tally:
        assert mod.solve(2, 0) == ("ours", 1)
        assert mod.solve(weights=3, hessians=0, scale=5) == ("ours", 5)  # keyword calls, as quantize_weight gets
        assert mod.solve(-1, 0) == ("original", 1)
    assert mod.solve is original
    assert tally.n == 5 and tally.note() == "took over 5"


def test_restored_on_error_and_silent_when_nothing_was_covered() -> None:
    mod = upstream()
    original = mod.solve
    with (
        pytest.raises(RuntimeError),
        taken_over(mod, "solve", lambda *a, **k: False, lambda *a, **k: None, "x", "took over {n}") as tally,
    ):
        assert mod.solve(1, 1) == ("original", 1)
        raise RuntimeError("oneshot failed")
    assert mod.solve is original and tally.n == 0 and tally.note() is None


def test_a_function_upstream_dropped_leaves_the_speed_up_off(caplog: pytest.LogCaptureFixture) -> None:
    mod = types.SimpleNamespace(__name__="upstream")
    with taken_over(mod, "solve", lambda *a: True, lambda *a: None, "the speed-up", "{n}") as tally:
        assert not hasattr(mod, "solve")
    assert tally.note() is None and "the speed-up is off" in caplog.text


def test_timed_adds_up_each_call_and_restores_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1.0, 1.5, 10.0, 12.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    mod = upstream()
    original = mod.solve
    with timed(mod, "solve") as watch:
        assert mod.solve(1, 1) == ("original", 1)
        assert mod.solve(1, 1, scale=2) == ("original", 2)
    assert mod.solve is original and watch.seconds == pytest.approx(2.5)
