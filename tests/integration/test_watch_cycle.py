"""The watcher's decisions without Ray: release detection (local dirs, an injected hub client), claims in a
real MLflow store (sqlite), retries, staleness and the race between two watchers. The job itself is run by a
recording runner here; tests/integration/test_watch.py runs real jobs from an S3 prefix."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from farm.errors import FarmError, SpecError
from farm.spec import JobSpec
from farm.tracking.mlflow_store import MlflowStore
from farm.watch.releases import HuggingFaceHub
from farm.watch.spec import load_watch, recipe_hash
from farm.watch.watcher import W, Watcher
from tests.conftest import tiny_spec, write_spec


class Recorder:
    """Stands in for `farm run`: records each job it is given; can fail on demand."""

    def __init__(self, fail: int = 0, delay: float = 0.0):
        self.jobs: list[JobSpec] = []
        self.fail, self.delay = fail, delay
        self.lock = threading.Lock()

    def start(self, spec: JobSpec) -> tuple[str, str, str]:
        time.sleep(self.delay)
        with self.lock:
            self.jobs.append(spec)
            if self.fail:
                self.fail -= 1
                raise FarmError("boom")
        return "finished", f"job{len(self.jobs)}", ""

    def poll(self, ref: str) -> str | None:
        return None


class Hub:
    def __init__(self, heads: dict[str, str]):
        self.heads = heads

    def head(self, repo: str, branch: str) -> str:
        return self.heads[f"{repo}@{branch}"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path: Path, fixture_paths: dict, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "bases" / "tiny"
    shutil.copytree(fixture_paths["tiny-llama"], base)
    write_spec(tmp_path / "job.yaml", tiny_spec(fixture_paths, str(tmp_path / "out"), methods=[{"method": "fp8"}]))
    watch = {
        "name": "nightly",
        "job": "job.yaml",
        "bases": [{"source": "bases/tiny", "name": "tiny"}, {"source": "hf://org/model@main", "name": "hub"}],
    }
    (tmp_path / "watch.yaml").write_text(yaml.safe_dump(watch))
    store = MlflowStore(f"sqlite:///{tmp_path / 'mlflow.db'}", "watch-test")
    return tmp_path, base, store


def make(
    tmp: Path, store: MlflowStore, runner: Recorder, hub: Hub, clock: Clock | None = None, **over: object
) -> Watcher:
    watch, template = load_watch(tmp / "watch.yaml")
    return Watcher(watch.model_copy(update=over), template, store, runner, hub, clock or Clock(), say=lambda s: None)


def test_new_release_once_then_unchanged_then_changed(setup) -> None:
    tmp, base, store = setup
    runner, hub = Recorder(), Hub({"org/model@main": "a" * 40})
    w = make(tmp, store, runner, hub)
    first = {r.base: r for r in w.cycle()}
    assert first["tiny"].action == "built" and first["hub"].action == "built"
    hub_job = next(j for j in runner.jobs if j.models[0].name == "hub")
    assert hub_job.models[0].source == "hf://org/model" and hub_job.models[0].revision == "a" * 40
    assert hub_job.tracking.tags["farm.release"] == "hf:org/model@" + "a" * 40
    assert {r.action for r in w.cycle()} == {"unchanged"} and len(runner.jobs) == 2
    # a new hub commit and a changed checkpoint are new releases
    hub.heads["org/model@main"] = "b" * 40
    cfg = base / "config.json"
    cfg.write_text(cfg.read_text() + " ")  # any byte of the config or a shard changes the identity
    actions = {r.base: r.action for r in w.cycle()}
    assert actions == {"tiny": "built", "hub": "built"} and len(runner.jobs) == 4
    claims = store.claims("farm-watch/")
    assert len(claims) == 4 and {c.tags[W + "state"] for c in claims} == {"finished"}


def test_failed_attempt_is_retried_then_given_up(setup) -> None:
    tmp, _, store = setup
    runner = Recorder(fail=10)
    w = make(tmp, store, runner, Hub({"org/model@main": "c" * 40}), max_attempts=2)
    assert {r.action for r in w.cycle()} == {"failed"}
    assert {r.action for r in w.cycle()} == {"failed"}
    results = w.cycle()
    assert {r.action for r in results} == {"gave up"} and "boom" in results[0].detail
    assert len(runner.jobs) == 4


def test_unfinished_claim_waits_until_stale(setup) -> None:
    tmp, _, store = setup
    clock = Clock()
    w = make(tmp, store, Recorder(), Hub({"org/model@main": "d" * 40}), clock, bases=[])
    watch, template = load_watch(tmp / "watch.yaml")
    hub_base = watch.bases[1]
    # a watcher that died mid-job leaves its claim "running"
    from farm.watch.releases import detect
    from farm.watch.watcher import PREFIX, release_key

    release = detect(hub_base, w.hub)
    key = release_key(release.identity, recipe_hash(template))
    assert store.claim(f"{PREFIX}{key}/1", {W + "state": "running", W + "claimed_at": str(int(clock.now))})
    w = make(tmp, store, Recorder(), w.hub, clock, bases=[hub_base])
    assert [r.action for r in w.cycle()] == ["in progress"]
    clock.now += 2 * 86400
    assert [r.action for r in w.cycle()] == ["built"]


def test_two_watchers_race_one_builds(setup) -> None:
    tmp, _, store = setup
    runner = Recorder(delay=0.5)
    hub = Hub({"org/model@main": "e" * 40})
    watchers = [make(tmp, MlflowStore(store.uri, "watch-test"), runner, hub) for _ in range(2)]
    results: list = []
    threads = [threading.Thread(target=lambda w=w: results.extend(w.cycle())) for w in watchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runner.jobs) == 2  # one per base, not per watcher
    assert sorted(r.action for r in results).count("built") == 2


def test_missing_base_is_reported_others_still_built(setup) -> None:
    tmp, _, store = setup
    runner = Recorder()
    watch, template = load_watch(tmp / "watch.yaml")
    missing = watch.bases[0].model_copy(update={"source": str(tmp / "nope"), "name": "gone"})
    w = Watcher(
        watch.model_copy(update={"bases": [missing, *watch.bases]}),
        template,
        store,
        runner,
        Hub({"org/model@main": "f" * 40}),
        Clock(),
        say=lambda s: None,
    )
    results = {r.base: r for r in w.cycle()}
    assert results["gone"].action == "failed" and "no such directory" in results["gone"].detail
    assert results["tiny"].action == results["hub"].action == "built"


def test_offline_hub_reads_the_cached_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    ref = tmp_path / "models--org--m" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("9" * 40)
    assert HuggingFaceHub().head("org/m", "main") == "9" * 40
    with pytest.raises(FarmError, match="not in the local cache"):
        HuggingFaceHub().head("org/other", "main")


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"bases": []}, "bases"),
        ({"jobb": "x"}, "unknown field"),
        ({"job": "absent.yaml"}, "cannot read spec"),
        ({"interval_s": 0}, "interval_s"),
    ],
)
def test_bad_watch_spec_is_one_line(tmp_path: Path, fixture_paths: dict, change: dict, needle: str) -> None:
    write_spec(tmp_path / "job.yaml", tiny_spec(fixture_paths, str(tmp_path / "out")))
    (tmp_path / "w.yaml").write_text(
        yaml.safe_dump({"name": "w", "job": "job.yaml", "bases": [{"source": "/x"}], **change})
    )
    with pytest.raises(SpecError, match=needle) as err:
        load_watch(tmp_path / "w.yaml")
    assert "\n" not in str(err.value)


def test_a_watch_cycle_imports_no_torch(setup) -> None:
    import subprocess
    import sys

    tmp, _, _ = setup
    code = (
        "import sys\n"
        "from farm.tracking.mlflow_store import MlflowStore\n"
        "from farm.watch.spec import load_watch\n"
        "from farm.watch.watcher import Watcher\n"
        "class R:\n"
        "    def start(self, spec): return 'finished', 'j', ''\n"
        "    def poll(self, ref): return None\n"
        "class H:\n"
        "    def head(self, repo, branch): return '1' * 40\n"
        f"watch, template = load_watch({str(tmp / 'watch.yaml')!r})\n"
        f"store = MlflowStore('sqlite:///{tmp / 'nt.db'}', 'x')\n"
        "results = Watcher(watch, template, store, R(), H(), say=print).cycle()\n"
        "heavy = [m for m in ('torch', 'transformers', 'llmcompressor', 'ray') if m in sys.modules]\n"
        "assert [r.action for r in results] == ['built', 'built'] and not heavy, (results, heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp)
    assert res.returncode == 0, res.stderr[-2000:]


def test_long_running_mode_cycles_on_the_injected_clock(setup) -> None:
    tmp, _, store = setup
    hub = Hub({"org/model@main": "1" * 40})
    runner, slept, reports = Recorder(), [], []
    w = make(tmp, store, runner, hub, interval_s=600)

    def sleep(seconds: float) -> None:  # the "interval": a new hub commit appears while the watcher sleeps
        slept.append(seconds)
        hub.heads["org/model@main"] = str(len(slept) + 1) * 40

    w.run(cycles=3, sleep=sleep, report=reports.append)
    assert slept == [600, 600] and len(reports) == 3
    assert [r.action for r in reports[1] if r.base == "hub"] == ["built"]
    assert [r.action for r in reports[1] if r.base == "tiny"] == ["unchanged"]
    assert len(runner.jobs) == 4  # tiny once, the hub base once per commit


def _claim_hub_release(tmp: Path, store: MlflowStore, clock: Clock, tags: dict[str, str]):
    from farm.watch.releases import detect
    from farm.watch.watcher import PREFIX, release_key

    watch, template = load_watch(tmp / "watch.yaml")
    hub, hub_base = Hub({"org/model@main": "e" * 40}), watch.bases[1]
    key = release_key(detect(hub_base, hub).identity, recipe_hash(template))
    base_tags = {W + "state": "running", W + "claimed_at": str(int(clock.now))}
    assert store.claim(f"{PREFIX}{key}/1", base_tags | tags)
    return make(tmp, store, Recorder(), hub, clock, bases=[hub_base])


def test_a_claim_whose_watcher_died_on_this_host_is_taken_over_at_once(setup) -> None:
    """`kill -9` of a watcher mid-build: its claim stays "running", but its process is gone from this host, so the
    next cycle builds the release again instead of waiting out `stale_after_s`."""
    import socket
    import subprocess
    import sys

    tmp, _, store = setup
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    w = _claim_hub_release(tmp, store, Clock(), {W + "owner": f"{socket.gethostname()}:{dead.pid}"})
    assert [r.action for r in w.cycle()] == ["built"]


def test_a_claim_whose_heartbeat_stopped_is_taken_over(setup) -> None:
    """A watcher on another host cannot be asked whether it lives: its heartbeat tag can. Fresh: in progress;
    silent for more than 5 heartbeats: taken over."""
    tmp, _, store = setup
    clock = Clock()
    w = _claim_hub_release(tmp, store, clock, {W + "owner": "elsewhere:1", W + "heartbeat": str(int(clock.now))})
    clock.now += 4 * 60
    assert [r.action for r in w.cycle()] == ["in progress"]
    clock.now += 2 * 60
    assert [r.action for r in w.cycle()] == ["built"]


def test_a_running_job_keeps_its_claim_alive(setup) -> None:
    tmp, _, store = setup
    runner = Recorder(delay=1.5)
    w = make(tmp, store, runner, Hub({"org/model@main": "f" * 40}), time.time, heartbeat_s=0.2)
    w.cycle()
    beats = [c.tags.get(W + "heartbeat") for c in store.claims("farm-watch/")]
    assert all(beats), beats
