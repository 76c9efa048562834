"""Every name farm records in MLflow under `farm.` (tags), defined once; metric names of the serving check
live with their arithmetic in `farm.serving.measure`. Pure: no MLflow import."""

from __future__ import annotations

PREFIX = "farm."


class Tag:
    """Run tags, e.g. `Tag.ROLE` == "farm.role" (job | base | variant | candidate)."""

    ARTIFACT_URI = PREFIX + "artifact_uri"
    ATTEMPT = PREFIX + "attempt"
    BASE_EVAL_ID = PREFIX + "base_eval_id"
    BUILD_STATE = PREFIX + "build_state"  # on a build claim: "done" once the variant is recorded or gave up
    BUILDER = PREFIX + "builder"  # on a build claim: the driver (host:pid) building the variant
    CALIBRATION_HASH = PREFIX + "calibration_hash"
    CANDIDATE_STATUS = PREFIX + "candidate_status"  # on a search candidate's run: chosen | passed | missed | failed
    CUDA_VISIBLE_DEVICES = PREFIX + "cuda_visible_devices"
    DDP_RANKS = PREFIX + "ddp_ranks"
    DDP_WORLD_SIZE = PREFIX + "ddp_world_size"
    DEVICE = PREFIX + "device"
    DRIVER = PREFIX + "driver"
    FAILURE = PREFIX + "failure"
    GATE = PREFIX + "gate"
    HEARTBEAT = PREFIX + "heartbeat"  # on a claim: when its holder last said it is alive (epoch seconds)
    GATE_REASONS = PREFIX + "gate_reasons"
    GATE_WARNINGS = PREFIX + "gate_warnings"
    GENERATION = PREFIX + "generation"
    JOB_ID = PREFIX + "job_id"
    JOB_NAME = PREFIX + "job_name"
    LABEL = PREFIX + "label"
    MANUAL_PROMOTION = PREFIX + "manual_promotion"
    METHOD = PREFIX + "method"
    MODEL = PREFIX + "model"
    MODEL_IDENTITY = PREFIX + "model_identity"
    MODEL_VERSION = PREFIX + "model_version"
    NOTES = PREFIX + "notes"
    PROMOTED_RUN = PREFIX + "promoted_run"
    RECORD_STATE = PREFIX + "record_state"  # on a recording claim: "done" once recorded, "failed" if it gave up
    RECORDING_RUN = PREFIX + "recording_run"  # on a recording claim: the run that records the variant
    RELEASE = PREFIX + "release"
    ROLE = PREFIX + "role"
    STALE = PREFIX + "stale"  # on a FINISHED variant run whose published artifact is gone: why it is not reused
    VARIANT_ID = PREFIX + "variant_id"
    VERSIONS = PREFIX + "versions"
    WATCH = PREFIX + "watch"
    WITHIN_THRESHOLD = PREFIX + "within_threshold"
    WORKER = PREFIX + "worker"
    RECIPE_SHA256 = PREFIX + "recipe_sha256"


class Metric:
    """Metrics other modules read back (the rest are named where they are computed)."""

    GPU_PEAK_BYTES = "gpu_peak_bytes"  # the CUDA allocator's peak while the variant quantized
    ONLOADED = "onloaded"  # 1: the weights stayed on the host and were onloaded a layer at a time


def tag(name: str) -> str:
    """The recorded name of a tag given without the prefix (a check's own tags)."""
    return PREFIX + name
