"""farm's command line. Imports nothing heavy at module level: torch, ray and mlflow load only inside the
commands that need them, and the driver process itself never imports torch (workers do)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from farm.errors import FarmError, SpecError
from farm.tracking.names import Tag


def _cmd_run(args: argparse.Namespace) -> int:
    from farm.report import fmt, table
    from farm.runtime.driver import run_job
    from farm.spec import load_spec

    spec = load_spec(args.spec)
    outcome = run_job(spec, args.tracking_uri, args.ray_address, args.verbose)
    rows = []
    for o in sorted(outcome.variants, key=lambda o: (o.variant.model_name, o.variant.method.label())):
        rows.append(
            [
                o.variant.label,
                o.variant.method.method,
                o.status,
                fmt(o.weights_bytes / 1e6 if o.weights_bytes else None, ".1f"),
                fmt(o.base_perplexity, ".2f"),
                fmt(o.perplexity, ".2f"),
                fmt(o.delta, "+.2f"),
                fmt(o.seconds, ".0f"),
                o.run_id,
                o.artifact_uri or o.reason,
            ]
        )
    print()
    print(table(["variant", "method", "status", "MB", "base ppl", "ppl", "delta", "s", "mlflow run", "artifact"], rows))
    served = _served_rows(spec, outcome.variants)
    if served:
        print("\nas served (vLLM):")
        print(table(served[0], served[1:]))
    phases = ", ".join(f"{k} {v:.1f}" for k, v in outcome.phases.items())
    print(
        f"\njob {outcome.plan.job_id} in {outcome.seconds:.0f} s ({phases}); tracking {outcome.tracking_uri}, "
        f"parent run {outcome.parent_run_id}"
    )
    return 0 if outcome.ok else 1


def _served_rows(spec: Any, variants: Sequence[Any]) -> list[list[Any]]:
    """The serving check's headline figures per variant: output tokens/s at the lowest and highest concurrency
    of the first shape, TTFT p50 at the lowest, weights on the GPU; [] when the job has no serving check."""
    from farm.report import fmt
    from farm.serving import measure

    ev = spec.evaluation.serving
    if ev is None:
        return []
    shape, low, high = ev.resolved_shapes()[0].name, ev.concurrency[0], ev.concurrency[-1]
    rows: list[list[Any]] = [
        ["variant", f"tok/s c{low}", f"tok/s c{high}", f"TTFT p50 c{low} ms", "weights GB", "KV tokens"]
    ]
    for o in sorted(variants, key=lambda o: o.variant.label):
        m = o.metrics
        ttft = m.get(measure.level_name(shape, low, "ttft_p50_s"))
        weights = m.get(measure.WEIGHTS)
        rows.append(
            [
                o.variant.label,
                fmt(m.get(measure.level_name(shape, low, "output_tokens_per_s")), ".0f"),
                fmt(m.get(measure.level_name(shape, high, "output_tokens_per_s")), ".0f"),
                fmt(ttft * 1e3 if ttft is not None else None, ".1f"),
                fmt(weights / 1e9 if weights is not None else None, ".2f"),
                fmt(m.get(measure.KV_TOKENS), ".0f"),
            ]
        )
    return rows


def _cmd_plan(args: argparse.Namespace) -> int:
    from farm.report import table
    from farm.runtime.driver import preflight
    from farm.spec import load_spec

    spec = load_spec(args.spec)
    plan = preflight(spec)
    rows = [
        [
            v.id,
            v.label,
            v.calibration.num_samples if v.method.requires_calibration else "-",
            v.calibration.max_seq_length if v.method.requires_calibration else "-",
            v.resources.num_gpus,
            v.resources.num_cpus,
            f"{v.resources.memory_bytes / 2**30:.1f}",
            ", ".join(v.method.ignore) or "nothing",
        ]
        for v in plan.variants
    ]
    heads = ["variant id", "variant", "samples", "seq len", "gpus", "cpus", "mem GiB", "kept in high precision"]
    print(table(heads, rows))
    if any(v.method.uses_validation for v in plan.variants):
        val = next(v.validation for v in plan.variants if v.validation)
        print(f"candidates judged on {val.source} ({val.max_tokens} tokens, windows of {val.seq_len})")
    if spec.resources.gpu_packing == "memory":
        print(
            "gpus: the most a variant may take; `farm run` gives each the share of a card its measured or estimated "
            "memory need takes (resources.gpu_packing: memory)"
        )
    print(f"job {plan.job_name} ({plan.job_id})")
    return 0


def _store(args: argparse.Namespace, experiment: str) -> Any:
    """The tracking store a read command names (--tracking-uri, else the local root's sqlite), reachable."""
    from farm.tracking.mlflow_store import MlflowStore, default_local_uri

    store = MlflowStore(args.tracking_uri or default_local_uri(args.root)[0], experiment)
    store.check_reachable()
    return store


def _cmd_compare(args: argparse.Namespace) -> int:
    from farm.report import fmt, table

    store = _store(args, args.experiment)
    uri = store.uri
    if bool(args.job) == bool(args.model):
        raise SpecError("compare: give a job id / experiment name, or --model NAME (across jobs)")
    if args.model:
        runs = store.find_runs(
            [f"tags.`{Tag.ROLE}` = 'variant'", f"tags.`{Tag.MODEL}` = '{args.model}'"],
            status="FINISHED",
            experiment_ids=store.all_experiment_ids(),
        )
    else:
        runs = store.runs_of_job(args.job)
    variants = [r for r in runs if r.tags.get(Tag.ROLE) == "variant"]
    if not variants:
        raise FarmError(f"no variants found for {args.model or args.job!r} at {uri}")
    rows = [
        [
            r.tags.get(Tag.JOB_ID, "")[:8],
            r.tags.get(Tag.MODEL),
            r.tags.get(Tag.LABEL),
            r.status,
            fmt(r.metrics.get("weights_bytes", 0) / 1e6, ".1f"),
            fmt(r.metrics["decoder_linear_bytes"] / 1e6 if "decoder_linear_bytes" in r.metrics else None, ".1f"),
            fmt(r.metrics.get("base_perplexity"), ".2f"),
            fmt(r.metrics.get("perplexity"), ".2f"),
            fmt(r.metrics.get("perplexity_delta"), "+.2f"),
            fmt(r.metrics.get("seconds_total"), ".0f"),
            r.tags.get(Tag.GATE, ""),
            r.tags.get(Tag.MODEL_VERSION, ""),
            r.run_id,
        ]
        for r in sorted(variants, key=lambda r: (r.tags.get(Tag.MODEL, ""), r.tags.get(Tag.LABEL, "")))
    ]
    print(
        table(
            [
                "job",
                "model",
                "variant",
                "status",
                "MB",
                "linear MB",
                "base ppl",
                "ppl",
                "delta",
                "s",
                "gate",
                "version",
                "mlflow run",
            ],
            rows,
        )
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from farm.report_html import Point, render

    store = _store(args, args.experiment)
    uri = store.uri
    runs = store.runs_of_job(args.job)
    variants = sorted(
        (r for r in runs if r.tags.get(Tag.ROLE) == "variant" and r.status == "FINISHED"),
        key=lambda r: r.tags.get(Tag.LABEL, ""),
    )
    if not variants:
        raise FarmError(f"no finished variants for job or experiment {args.job!r} at {uri}")
    base_ids = {r.tags.get(Tag.BASE_EVAL_ID) for r in variants}
    bases = store.find_runs(
        [f"tags.`{Tag.ROLE}` = 'base'"], status="FINISHED", experiment_ids=[store.experiment_of(variants[0].run_id)]
    )
    base = next((dict(b.metrics) for b in bases if b.tags.get(Tag.BASE_EVAL_ID) in base_ids), {})
    points = [
        Point(
            f"{r.tags.get(Tag.MODEL)}/{r.tags.get(Tag.LABEL)}",
            dict(r.metrics),
            r.tags.get(Tag.GATE, ""),
            r.tags.get(Tag.GATE_REASONS, ""),
            r.tags.get(Tag.GATE_WARNINGS, ""),
        )
        for r in variants
    ]
    job_id = variants[0].tags.get(Tag.JOB_ID, args.job)
    page = render(job_id, base, points)
    out = Path(args.out or f"report-{job_id}.html")
    out.write_text(page, encoding="utf-8")
    parents = [r for r in runs if r.tags.get(Tag.ROLE) == "job"]
    if parents:
        store.log_text(parents[0].run_id, page, "report.html")
    print(f"{out} ({len(points)} variants){'; logged to run ' + parents[0].run_id if parents else ''}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from farm.runtime import submit
    from farm.spec import load_spec

    spec = load_spec(args.spec)  # a bad spec fails here, before anything reaches the cluster
    job_id = submit.submit(spec, args.address, args.tracking_uri)
    print(job_id)
    if args.wait:
        state = submit.wait(args.address, job_id, args.timeout)
        print(state)
        return 0 if state == "SUCCEEDED" else 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from farm.runtime import submit

    print(submit.status(args.address, args.job_id))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from farm.runtime import submit

    print(submit.logs(args.address, args.job_id), end="")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from farm.runtime import submit

    stopped = submit.stop(args.address, args.job_id)
    print("stopping" if stopped else "already finished")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    """Apply a promotion by hand: point an alias at a version, with who, why and when recorded on the version
    and on the variant's run."""
    import datetime as dt
    import getpass
    import json

    store = _store(args, "farm")
    version, run_id = store.version_run(args.model, args.version)
    record = {
        "alias": args.alias,
        "reason": args.reason,
        "by": getpass.getuser(),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    store.set_aliases(args.model, {args.alias: version})
    store.tag_version(
        args.model,
        version,
        {
            "promoted_alias": args.alias,
            "promotion_reason": args.reason,
            "promoted_by": record["by"],
            "promoted_at": record["at"],
        },
    )
    if run_id:
        store.log(run_id, tags={Tag.MANUAL_PROMOTION: json.dumps(record)})
    print(f"{args.model} version {version} is now @{args.alias} ({args.reason})")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from farm.report import table
    from farm.runtime.driver import tracking_target
    from farm.tracking.mlflow_store import MlflowStore
    from farm.watch.releases import HuggingFaceHub
    from farm.watch.spec import load_watch
    from farm.watch.watcher import CycleResult, LocalRunner, RayJobRunner, Runner, Watcher

    watch, template = load_watch(args.spec)
    uri = args.tracking_uri or watch.tracking_uri or tracking_target(template, None)[0]
    store = MlflowStore(uri, template.tracking.experiment)
    store.check_reachable()
    runner: Runner = (
        RayJobRunner(watch.submit_address, uri) if watch.submit_address else LocalRunner(uri, args.ray_address)
    )
    failed = False

    def report(results: list[CycleResult]) -> None:
        nonlocal failed
        failed = any(r.action in {"failed", "gave up"} for r in results)
        print(
            table(["base", "action", "release", "detail"], [[r.base, r.action, r.release, r.detail] for r in results]),
            flush=True,
        )

    Watcher(watch, template, store, runner, HuggingFaceHub()).run(1 if args.once else args.cycles, report=report)
    return 1 if failed else 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from farm.methods.precision import Grid
    from farm.report import table
    from farm.runtime.sensitivity import profile_job
    from farm.spec import load_spec

    if args.bits not in (4, 8):
        raise SpecError(f"sensitivity: --bits must be 4 or 8 (got {args.bits})")
    grid = Grid(args.bits, args.group_size or None)
    spec = load_spec(args.spec)
    text = "validation" if spec.validation else "calibration"
    for rec in profile_job(spec, grid, args.tokens, args.seq_len, args.model, args.tracking_uri):
        p = rec.profile
        worst = max(max(p.layers.values(), default=0.0), 1e-9)
        rows = [[f"layer {i}", f"{d:+.3f}", "#" * max(0, round(30 * d / worst))] for i, d in sorted(p.layers.items())]
        rows += [[k, f"{d:+.3f}", ""] for k, d in p.extra.items()]
        print(
            f"{rec.model}: perplexity {p.base_perplexity:.2f} on {p.tokens} {text} tokens; each row alone "
            f"at W{grid.bits}{f' g{grid.group_size}' if grid.group_size else ''} (round-to-nearest)"
        )
        print(table(["module", "ppl delta", ""], rows))
        print(f"MLflow run {rec.run_id} ({p.seconds:.0f} s)")
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from farm import fixtures

    return fixtures.main(["--root", args.root] if args.root else [])


def _store_args(p: argparse.ArgumentParser, experiment: bool = True) -> None:
    """Where the read commands find MLflow: --tracking-uri, else the sqlite store under --root."""
    p.add_argument("--tracking-uri", default=None)
    if experiment:
        p.add_argument("--experiment", default="farm", help="experiment searched for a job id")
    p.add_argument("--root", default=".farm", help="local farm root of the default sqlite store")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="farm", description="Distributed batch quantization of LLMs on Ray, recorded in MLflow."
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="plan, quantize, evaluate and record every variant of a job spec")
    run.add_argument("spec", help="job spec YAML")
    run.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    run.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: spec, then local sqlite)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished variants (always on: finished variant ids are never rebuilt)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="stream worker logs")
    run.set_defaults(func=_cmd_run)
    plan = sub.add_parser("plan", help="validate a spec and print its variants without running anything")
    plan.add_argument("spec")
    plan.set_defaults(func=_cmd_plan)
    cmp_ = sub.add_parser("compare", help="table of a job's variants against their base, from MLflow")
    cmp_.add_argument("job", nargs="?", help="job id or experiment name (newest job in it)")
    cmp_.add_argument("--model", default=None, help="every finished variant of this base model, across jobs")
    _store_args(cmp_)
    cmp_.set_defaults(func=_cmd_compare)
    rp = sub.add_parser("report", help="HTML report of a job (plots, Pareto front, gate outcomes), logged to MLflow")
    rp.add_argument("job", help="job id or experiment name (newest job in it)")
    rp.add_argument("--out", default=None, help="output file (default: report-<job id>.html)")
    _store_args(rp)
    rp.set_defaults(func=_cmd_report)
    from farm.runtime.submit import default_address

    sb = sub.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs API); prints the job id")
    sb.add_argument("spec")
    sb.add_argument(
        "--address",
        default=default_address(),
        help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    sb.add_argument("--tracking-uri", default=None, help="MLflow tracking URI the cluster should use")
    sb.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    sb.add_argument("--timeout", type=float, default=24 * 3600)
    sb.set_defaults(func=_cmd_submit)
    for name, func, text in (
        ("status", _cmd_status, "state of a submitted job"),
        ("logs", _cmd_logs, "driver output of a submitted job"),
        ("stop", _cmd_stop, "stop a submitted job (its open MLflow runs end FAILED)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_id")
        cmd.add_argument("--address", default=default_address())
        cmd.set_defaults(func=func)
    pr = sub.add_parser("promote", help="point a registry alias at a model version by hand, with a reason")
    pr.add_argument("model", help="registered model name (one per base model)")
    pr.add_argument("version", help="version number or @alias (e.g. @candidate)")
    pr.add_argument("--alias", required=True, help="alias to set, e.g. production-int8")
    pr.add_argument("--reason", required=True, help="why (recorded on the version and the run)")
    _store_args(pr, experiment=False)
    pr.set_defaults(func=_cmd_promote)
    wt = sub.add_parser("watch", help="re-quantize bases when a new release appears (watermarks in MLflow)")
    wt.add_argument("spec", help="watch spec YAML")
    wt.add_argument("--once", action="store_true", help="one cycle, then exit (for cron); 1 if a base failed")
    wt.add_argument("--cycles", type=int, default=None, help="stop after this many cycles (default: forever)")
    wt.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the watch spec's, then the job's)")
    wt.add_argument("--ray-address", default=None, help="Ray cluster for in-process jobs")
    wt.set_defaults(func=_cmd_watch)
    se = sub.add_parser(
        "sensitivity",
        help="perplexity cost of quantizing each decoder layer alone, per model of "
        "a job (recorded in MLflow; the mixed method's input)",
    )
    se.add_argument("spec", help="job spec YAML (its models and calibration text)")
    se.add_argument("--model", default=None, help="only this model (display name)")
    se.add_argument("--bits", type=int, default=4, help="weight bits of the probe grid (4 or 8)")
    se.add_argument("--group-size", type=int, default=128, help="weights per scale (0 = per output channel)")
    se.add_argument("--tokens", type=int, default=4096, help="calibration tokens each probe is scored on")
    se.add_argument("--seq-len", type=int, default=512)
    se.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: spec, then local sqlite)")
    se.set_defaults(func=_cmd_sensitivity)
    fx = sub.add_parser("fixtures", help="fetch and build the offline fixtures (SmolLM2, Shakespeare, tiny Llama)")
    fx.add_argument("--root", default=None)
    fx.set_defaults(func=_cmd_fixtures)
    return p


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds the driver, which marks its open MLflow runs FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its logger's level on import
    try:
        return int(args.func(args))
    except FarmError as err:
        from farm.secrets import redact

        print(f"farm: error: {redact(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("farm: interrupted; open MLflow runs were marked FAILED", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `farm compare | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
