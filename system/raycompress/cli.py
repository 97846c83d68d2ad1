"""Command line: argument parsing only. Maps onto `config.JobConfig` and calls the orchestrator.

    raycompress run CONFIG.yaml --output DIR          all stages
    raycompress select|compress|evaluate CONFIG.yaml --output DIR   one stage
    raycompress report DIR                            (re)write DIR's report.json / .md / .html
    raycompress report DIR DIR ... [--output F.html|F.md]   compare runs: one column per run
    raycompress fetch-model ALIAS_OR_DIR             convert/cache a model, print its folder
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
        s.add_argument("--output", "-o", type=Path, required=True, help="job output folder")
    r = sub.add_parser("report", help="report one run folder, or compare several side by side")
    r.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="run folder(s) written by `raycompress run`")
    r.add_argument("--output", "-o", type=Path, help="also write the report / comparison to this .html or .md file")
    f = sub.add_parser("fetch-model", help="resolve (and convert once) a model; print its folder")
    f.add_argument("model")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raycompress.models.fetch import resolve_model, set_offline

    set_offline()
    if args.command == "fetch-model":
        print(resolve_model(args.model))
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
    model_dir = resolve_model(job.model)
    run_job(job, args.output, stages, model_dir)
    if Stage.REPORT in stages:
        print((args.output / "report.md").read_text())
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
