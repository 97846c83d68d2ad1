"""Command line: argument parsing only. Maps onto `config.JobConfig` and calls the orchestrator.

    raycompress run CONFIG.yaml --output DIR          all stages
    raycompress run CONFIG.yaml --output DIR --dry-run   print the plan; refuse if the cluster is too small
    raycompress select|compress|train|evaluate CONFIG.yaml --output DIR   one stage
    raycompress submit CONFIG.yaml --output URI [--address http://HEAD:8265] [--wait]   as a Ray job
    raycompress status|logs [--follow]|stop JOB_ID [--address ...]   watch or stop a submitted job
    raycompress sweep SWEEP.yaml --output DIR        a grid of job variants x seeds, compared in DIR/sweep.html
    raycompress report DIR                            (re)write DIR's report.json / .md / .html
    raycompress report DIR DIR ... [--output F.html|F.md]   compare runs: one column per run
    raycompress fetch-model ALIAS_DIR_OR_URI         convert/cache a model on this node, print its folder

DIR may be a local folder or a URI (s3://bucket/run, gs://..., hdfs://..., file://...). Under a
Ray job (`submit`, or `ray job submit -- python -m raycompress run ...`) it must be a URI or an
absolute path: a relative one would land in Ray's temporary copy of the working directory.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycompress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "select", "compress", "train", "evaluate"):
        s = sub.add_parser(name, help=f"{name} stage" if name != "run" else "all stages")
        s.add_argument("config", type=Path, help="job YAML file")
        s.add_argument("--output", "-o", required=True, help="job output folder: a path or URI")
        s.add_argument("--dry-run", action="store_true", help="print the plan and the resources it asks for; "
                       "exit 2 if the cluster cannot give them")
        s.add_argument("--force-stage", action="append", default=[], choices=["select", "compress", "train", "evaluate"],
                       help="redo this stage (and the ones after it) even though the folder holds it from another job")
    j = sub.add_parser("submit", help="submit a job file to a Ray cluster's Job Submission server")
    j.add_argument("config", type=Path, help="job YAML file")
    j.add_argument("--output", "-o", required=True, help="job output: a URI or an absolute path on a shared volume")
    j.add_argument("--wait", action="store_true", help="follow the log until the job ends; exit 1 unless it SUCCEEDED")
    for name, text in (("status", "a submitted job's status"), ("logs", "a submitted job's log"),
                       ("stop", "stop a submitted job (a resubmission resumes it)")):
        x = sub.add_parser(name, help=text)
        x.add_argument("job_id")
        if name == "logs":
            x.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    for x in (j, *(sub.choices[n] for n in ("status", "logs", "stop"))):
        x.add_argument("--address", help="the cluster's dashboard address, e.g. http://127.0.0.1:8265 "
                       "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    w = sub.add_parser("sweep", help="run a sweep file's points (job variants x seeds) and compare them")
    w.add_argument("config", type=Path, help="sweep YAML file (a base job, axes, seeds)")
    w.add_argument("--output", "-o", required=True, help="sweep output folder: a path or URI")
    r = sub.add_parser("report", help="report one run folder, or compare several side by side")
    r.add_argument("dirs", type=_location, nargs="+", metavar="DIR", help="run folder(s) written by `raycompress run`")
    r.add_argument("--output", "-o", type=_location, help="also write the report / comparison to this .html or .md file")
    f = sub.add_parser("fetch-model", help="resolve (and convert once) a model; print its folder")
    f.add_argument("model")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _location(arg: str) -> str:
    """A URI as given; a local path made absolute (it may be handed to other processes)."""
    return arg if "://" in arg else str(Path(arg).expanduser().absolute())


def _output(arg: str) -> str:
    """`--output` of run/select/compress/evaluate as a location.

    Raises:
        ValueError: a relative path inside a Ray job (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR for the
            entrypoint), where the working directory is Ray's temporary copy.
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and "://" not in arg and not os.path.isabs(os.path.expanduser(arg)):
        raise ValueError(f"--output '{arg}' is relative, and this runs inside a Ray job whose working directory "
                         "is Ray's temporary copy, deleted when the job ends: give a URI (s3://bucket/runs/x) or "
                         "an absolute path on a volume every node mounts")
    return _location(arg)


def main(argv: list[str] | None = None) -> int:
    """Run the command; an error is one message and exit 2 (bad input: the job, a file, the
    folder) or 1 (a failure while running), with the traceback only under --debug."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raycompress.distributed.guard import ForeignOutput, OutputBusy, StageMismatch
    from raycompress.distributed.plan import PreflightError

    try:
        return _main(args)
    except (PreflightError, StageMismatch, ForeignOutput, OutputBusy, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"error: {getattr(args, 'config', '')}: {exc}" if getattr(args, "config", None) else f"error: {exc}",
              file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns any failure into a message
        if args.debug:
            raise
        from raycompress.distributed.restarts import StageFailed

        what = str(exc) if isinstance(exc, StageFailed) else f"{type(exc).__name__}: {exc}"  # it names the type
        print(f"error: {what}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _main(args) -> int:
    from raycompress.models.fetch import resolve_model, set_offline

    set_offline()
    if args.command == "fetch-model":
        print(resolve_model(args.model, Path.cwd()).local())
        return 0
    if args.command == "report":
        return _report(args.dirs, args.output)
    if args.command in ("submit", "status", "logs", "stop"):
        return _jobs(args)
    if args.command == "sweep":
        return _sweep(args)
    from raycompress.config import ConfigError, load_config
    from raycompress.distributed.orchestrator import ORDER, Stage, run_job

    try:
        job = load_config(args.config)
        output = _output(args.output)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "train" and job.train is None:
        print(f"error: {args.config}: the job has no train section; add one (train: {{steps: N, ...}}) to run the train stage",
              file=sys.stderr)
        return 2
    stages = ORDER if args.command == "run" else [Stage(args.command)]
    try:
        model = resolve_model(job.model, job.base_dir, job.storage.cache_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {args.config}: model: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(job, model)
    run_job(job, output, stages, model, tuple(args.force_stage))
    if Stage.REPORT in stages:
        from raycompress.storage import uri

        print(uri.read_text(uri.join(output, "report.md")))
    return 0


def _sweep(args) -> int:
    """`raycompress sweep`: exit 2 on a bad sweep or job, 1 when a point failed, else 0."""
    from raycompress.config import ConfigError
    from raycompress.distributed.sweep import run_sweep
    from raycompress.models.fetch import resolve_model
    from raycompress.sweep.config import load_sweep

    try:
        sweep, points = load_sweep(args.config)
        output = _output(args.output)
        model = resolve_model(points[0].job.model, points[0].job.base_dir, points[0].job.storage.cache_dir)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_sweep(sweep, points, model, output)
    from raycompress.storage import uri

    print(uri.read_text(uri.join(output, "sweep.md")))
    for unit, err in result["errors"].items():
        print(f"error: {unit}: {err}", file=sys.stderr)
    return 1 if result["errors"] else 0


def _dry_run(job, model) -> int:
    from raycompress.distributed.plan import build_plan, check_fits, format_plan, preflight
    from raycompress.distributed.resources import cluster_nodes, init_ray

    om = preflight(job, model)  # what the job names, before Ray starts
    init_ray(job.ray)
    nodes = cluster_nodes()
    plan = build_plan(job, model, sum(n.get("GPU", 0.0) for n in nodes), om)
    problems = check_fits(plan, nodes)
    print(format_plan(plan, problems))
    return 2 if problems else 0


def _echo(text: str) -> None:
    print(text, end="", flush=True)


def _jobs(args) -> int:
    """submit / status / logs / stop through Ray's Job Submission SDK (`raycompress.submit`)."""
    import json

    from raycompress import submit as jobs
    from raycompress.config import ConfigError

    if args.command == "status":
        print(json.dumps(jobs.status(args.job_id, args.address), indent=2))
    elif args.command == "logs" and args.follow:
        jobs.wait(args.job_id, args.address, on_log=_echo)
    elif args.command == "logs":
        _echo(jobs.logs(args.job_id, args.address))
    elif args.command == "stop":
        print(f"{args.job_id}: {'stop requested' if jobs.stop(args.job_id, args.address) else 'not running'}")
    else:
        try:
            job_id = jobs.submit(args.config, args.output, args.address)
        except (ConfigError, jobs.SubmitError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(job_id, flush=True)
        if args.wait:
            final = jobs.wait(job_id, args.address, on_log=_echo)
            print(f"{job_id}: {final}")
            return 0 if final == "SUCCEEDED" else 1
    return 0


def _report(dirs: list[Path], output: Path | None) -> int:
    from raycompress.report.compare import report_runs

    try:
        print(report_runs(dirs, output))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
