"""Everything farm records in MLflow: job runs, variant runs, metrics, artifacts, registry versions.

The only module that imports mlflow. It uses an explicit `MlflowClient` (no fluent, process-global active
run), batches metrics/params/tags into one `log_batch` call per run (a call costs 30-68 ms against a server),
and never lets a run it opened stay RUNNING: callers end every run they start through `end_run`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import TrackingError
from farm.secrets import redact
from farm.tracking.names import PREFIX as TAG
from farm.tracking.names import Metric, Tag

PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
MAX_PARAM = 6000


@dataclass(frozen=True)
class RunRow:
    run_id: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    artifact_uri: str
    start_time: int


@dataclass(frozen=True)
class Claim:
    name: str
    tags: dict[str, str]
    created_ms: int


def _row(run: Any) -> RunRow:
    return RunRow(
        run.info.run_id,
        run.info.status,
        dict(run.data.tags),
        dict(run.data.params),
        dict(run.data.metrics),
        run.info.artifact_uri,
        run.info.start_time or 0,
    )


class MlflowStore:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        # MLflow prints "View run ... at <tracking URI>" on every run end, credentials included; farm prints
        # its own redacted lines instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.experiment_name = experiment
        self._artifact_location = artifact_location
        self._experiment_id: str | None = None
        if uri.startswith("sqlite:///"):
            self.client = self._open_sqlite(Path(uri[len("sqlite:///") :]))
        else:
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # -- connection ---------------------------------------------------------------------------------------
    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast with one line when a tracking server is down, before any work is started."""
        if self.uri.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(self.uri)
            netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
            request = urllib.request.Request(  # noqa: S310 - http(s) only
                parts._replace(netloc=netloc, path=parts.path.rstrip("/") + "/health").geturl()
            )
            if parts.username:
                token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                    if resp.status != 200:
                        raise TrackingError(f"MLflow server {redact(self.uri)} answered {resp.status} on /health")
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise TrackingError(f"MLflow server {redact(self.uri)} is unreachable ({reason})") from None
        self.experiment_id  # creates the experiment; also proves a sqlite store is writable  # noqa: B018

    def _open_sqlite(self, path: Path) -> Any:
        """Open (creating it if need be) a sqlite store under an exclusive lock beside it: MLflow's schema
        migrations are not safe against a concurrent creator (two first-time drivers both failed and left
        temporary tables behind). A store created here that cannot be finished is removed, not left half-made;
        one that cannot be opened is one line."""
        import fcntl

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = path.with_name(path.name + ".lock").open("a")
        except OSError as err:
            raise TrackingError(f"tracking store {redact(self.uri)}: cannot create ({err.strerror or err})") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            new = not path.exists() or path.stat().st_size == 0
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)  # migrates a new store
                client.search_experiments(max_results=1)  # an old one answers
                return client
            except Exception as err:
                if new:
                    path.unlink(missing_ok=True)
                first = (str(err).splitlines() or [""])[0][:300]
                raise TrackingError(
                    f"tracking store {redact(self.uri)} cannot be opened ({type(err).__name__}: {redact(first)})"
                ) from None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                from mlflow.exceptions import MlflowException

                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self._artifact_location
                    )
                except MlflowException:  # another driver created it first
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # -- runs ---------------------------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        all_tags = {RUN_NAME: name, **tags}
        if parent_id:
            all_tags[PARENT] = parent_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def log(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)[:MAX_PARAM]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)[:MAX_PARAM]) for k, v in (tags or {}).items()],
        )

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def load_json(self, run_id: str, artifact_file: str) -> Any:
        """A JSON artifact of a run, or None when the run has no such file."""
        import json
        import tempfile

        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="farm-artifact-") as tmp:
            try:
                path = self.client.download_artifacts(run_id, artifact_file, tmp)
            except (MlflowException, OSError):
                return None
            return json.loads(Path(path).read_text())

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def upload_dir(self, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        return f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"

    def reopen_run(self, run_id: str, tags: dict[str, str]) -> None:
        """A finished or failed run RUNNING again (a re-run of its job), with its failure reason cleared."""
        self.client.update_run(run_id, status="RUNNING")
        with contextlib.suppress(Exception):  # no reason was recorded
            self.client.delete_tag(run_id, Tag.FAILURE)
        self.log(run_id, tags=tags)

    def end_run(self, run_id: str, ok: bool, reason: str | None = None, status: str | None = None) -> None:
        if reason:
            self.client.set_tag(run_id, Tag.FAILURE, reason[:MAX_PARAM])
        self.client.set_terminated(run_id, status=status or ("FINISHED" if ok else "FAILED"))

    def find_runs(
        self,
        filters: Iterable[str],
        status: str | None = None,
        experiment_ids: list[str] | None = None,
        max_results: int = 1000,
    ) -> list[RunRow]:
        clauses = list(filters)
        if status:
            clauses.append(f"attributes.status = '{status}'")
        runs = self.client.search_runs(
            experiment_ids or [self.experiment_id],
            " and ".join(clauses),
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )
        return [_row(r) for r in runs]

    def finished(self, role: str, key_tag: str, value: str, also: dict[str, str] | None = None) -> RunRow | None:
        """The newest FINISHED run of this role with tag `key_tag` = value (and the `also` tags), for dedup and
        resume."""
        extra = [f"tags.`{TAG}{k}` = '{v}'" for k, v in (also or {}).items()]
        rows = self.find_runs(
            [f"tags.`{Tag.ROLE}` = '{role}'", f"tags.`{TAG}{key_tag}` = '{value}'", *extra],
            status="FINISHED",
            max_results=1,
        )
        return rows[0] if rows else None

    def measured_peaks(self) -> dict[tuple[str, str, int, int], tuple[float, bool]]:
        """(GPU peak bytes, onloaded) of the newest finished variant of each (model identity, method label,
        calibration samples, calibration length) in this experiment that measured one: what GPU packing reserves
        for the next variant of that kind (farm/packing.py)."""
        rows = self.find_runs(
            [f"tags.`{Tag.ROLE}` = 'variant'", f"metrics.{Metric.GPU_PEAK_BYTES} > 0"], status="FINISHED"
        )
        out: dict[tuple[str, str, int, int], tuple[float, bool]] = {}
        for r in rows:  # newest first
            try:
                key = (
                    r.params["model.identity"],
                    r.tags[Tag.LABEL],
                    int(r.params["calibration.num_samples"]),
                    int(r.params["calibration.max_seq_length"]),
                )
            except (KeyError, ValueError):
                continue
            out.setdefault(key, (r.metrics[Metric.GPU_PEAK_BYTES], bool(r.metrics.get(Metric.ONLOADED))))
        return out

    def all_experiment_ids(self) -> list[str]:
        return [
            e.experiment_id
            for e in self.client.search_experiments(max_results=1000)
            if not e.name.startswith(("farm-watch/", "farm-record/"))
        ]

    def experiment_of(self, run_id: str) -> str:
        return str(self.client.get_run(run_id).info.experiment_id)

    def runs_of_job(self, job: str) -> list[RunRow]:
        """Variant and base runs of a job id, or of the newest job in an experiment of that name."""
        exp_ids = [self.experiment_id]
        exp = self.client.get_experiment_by_name(job)
        if exp is not None:
            exp_ids = [exp.experiment_id]
            parents = self.find_runs([f"tags.`{Tag.ROLE}` = 'job'"], experiment_ids=exp_ids, max_results=1)
            if not parents:
                return []
            job = parents[0].tags.get(Tag.JOB_ID, "")
        runs = self.find_runs([f"tags.`{Tag.JOB_ID}` = '{job}'"], experiment_ids=exp_ids)
        if not runs and exp is None:  # a job id is unique: find it in whichever experiment holds it
            runs = self.find_runs([f"tags.`{Tag.JOB_ID}` = '{job}'"], experiment_ids=self.all_experiment_ids())
        return runs

    # -- registry -----------------------------------------------------------------------------------------
    def register(self, name: str, run_id: str, artifact_path: str, tags: dict[str, str], description: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="quantized variants of one base model (farm)")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = self.client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
        return str(mv.version)

    def version_of_run(self, name: str, run_id: str) -> str | None:
        """The version of registered model `name` made from `run_id`, if any (None when the model is not there)."""
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return str(max(int(mv.version) for mv in versions)) if versions else None

    def set_aliases(self, name: str, aliases: dict[str, str]) -> None:
        for alias, version in aliases.items():
            self.client.set_registered_model_alias(name, alias, version)

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value[:MAX_PARAM])

    def version_run(self, name: str, ref: str) -> tuple[str, str]:
        """(version, run id) of a registered model version given as a number or an @alias."""
        from mlflow.exceptions import MlflowException

        try:
            mv = (
                self.client.get_model_version_by_alias(name, ref[1:])
                if ref.startswith("@")
                else self.client.get_model_version(name, ref)
            )
        except MlflowException as err:
            raise TrackingError(f"no model version {name} {ref} ({err.error_code})") from None
        return str(mv.version), str(mv.run_id)

    # -- claims: exclusive markers (the release watcher's ledger) -----------------------------------------------
    def claim(self, name: str, tags: dict[str, str]) -> bool:
        """Create experiment `name` as an exclusive claim. Experiment names are unique in the tracking database
        (deleted ones included), so of several watchers racing for one release exactly one gets True."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_experiment(name, tags=tags)
        except MlflowException as err:
            if err.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            raise
        return True

    def claims(self, prefix: str) -> list[Claim]:
        """Claims whose name starts with `prefix` (no LIKE wildcards in it), oldest first."""
        from mlflow.entities import ViewType

        out: list[Claim] = []
        token = None
        while True:
            page = self.client.search_experiments(
                view_type=ViewType.ALL,
                filter_string=f"name LIKE '{prefix}%'",
                order_by=["creation_time ASC"],
                page_token=token,
            )
            out += [Claim(e.name, dict(e.tags), e.creation_time or 0) for e in page]
            token = page.token
            if not token:
                return out

    def hide_claim(self, name: str) -> None:
        """Delete a claim's experiment: out of the UI's list, and its name stays taken."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            self.client.delete_experiment(exp.experiment_id)

    def tag_claim(self, name: str, tags: dict[str, str]) -> None:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            raise TrackingError(f"claim {name!r} vanished from {redact(self.uri)}")
        for key, value in tags.items():
            self.client.set_experiment_tag(exp.experiment_id, key, value[:MAX_PARAM])


def is_tracking_failure(err: BaseException) -> bool:
    """An error from talking to the tracking server (after the client's own retries)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(err, MlflowException | RequestException | ConnectionError)


def default_local_uri(root: str) -> tuple[str, str]:
    """sqlite tracking + local artifacts under a local farm root (the embedded default)."""
    base = Path(root if not root.startswith("s3://") else ".farm").resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri()


def new_local_store(uri: str) -> bool:
    """A sqlite tracking store that does not exist yet: creating it runs MLflow's migrations (seconds)."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()


def environ_uri() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI")
