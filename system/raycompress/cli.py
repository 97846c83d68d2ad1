"""Command line: argument parsing only. Maps onto `config.JobConfig` and calls the orchestrator.

    raycompress run CONFIG.yaml --output DIR          all stages
    raycompress select|compress|evaluate CONFIG.yaml --output DIR   one stage
    raycompress report DIR                            (re)write DIR's report.json / .md / .html
    raycompress report DIR DIR ... [--output F.html|F.md]   compare runs: one column per run
    raycompress fetch-model ALIAS_DIR_OR_URI         convert/cache a model on this node, print its folder

DIR may be a local folder or a URI (s3://bucket/run, gs://..., hdfs://..., file://...).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycompress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "select", "compress", "evaluate"):
        s = sub.add_parser(name, help=f"{name} stage" if name != "run" else "all stages")
        s.add_argument("config", type=Path, help="job YAML file")
        s.add_argument("--output", "-o", type=_location, required=True, help="job output folder: a path or URI")
    r = sub.add_parser("report", help="report one run folder, or compare several side by side")
    r.add_argument("dirs", type=_location, nargs="+", metavar="DIR", help="run folder(s) written by `raycompress run`")
    r.add_argument("--output", "-o", type=_location, help="also write the report / comparison to this .html or .md file")
    f = sub.add_parser("fetch-model", help="resolve (and convert once) a model; print its folder")
    f.add_argument("model")
    p.add_argument("--log-level", default="INFO")
    return p


def _location(arg: str) -> str:
    """A URI as given; a local path made absolute (it may be handed to other processes)."""
    return arg if "://" in arg else str(Path(arg).expanduser().absolute())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raycompress.models.fetch import resolve_model, set_offline

    set_offline()
    if args.command == "fetch-model":
        print(resolve_model(args.model, Path.cwd()).local())
        return 0
    if args.command == "report":
        return _report(args.dirs, args.output)
    from raycompress.config import ConfigError, load_config
    from raycompress.distributed.orchestrator import ORDER, Stage, run_job

    try:
        job = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stages = ORDER if args.command == "run" else [Stage(args.command)]
    try:
        model = resolve_model(job.model, job.base_dir, job.storage.cache_dir)
    except FileNotFoundError as exc:
        print(f"error: {args.config}: model: {exc}", file=sys.stderr)
        return 2
    run_job(job, args.output, stages, model)
    if Stage.REPORT in stages:
        from raycompress.storage import uri

        print(uri.read_text(uri.join(args.output, "report.md")))
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
