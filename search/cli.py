"""The `basin` command line: one subcommand per job, each a short function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from evaluators.protocol import EvaluatorError
from merging import MergeError
from search.config import ConfigError

EXIT_USAGE = 2


def _merge(args: argparse.Namespace) -> int:
    from merging import export_merge, load_recipe

    recipe = load_recipe(args.recipe)
    out = export_merge(recipe, args.out, force=args.force, device=args.device,
                       allow_pickle=args.allow_pickle, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from merging import dump_recipe, from_mergekit, load_recipe, to_mergekit

    source = Path(args.file)
    if not source.is_file():
        raise MergeError(f"file not found: {source}")
    try:
        data = yaml.safe_load(source.read_text())
    except yaml.YAMLError as exc:
        raise MergeError(f"{source} is not valid YAML: {exc}") from None
    is_mergekit = isinstance(data, dict) and "merge_method" in data
    if args.to == "mergekit":
        text = to_mergekit(from_mergekit(data) if is_mergekit else load_recipe(source))
    else:
        from merging import recipe_from_dict

        text = dump_recipe(from_mergekit(data) if is_mergekit else recipe_from_dict(data))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _run(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.study import run_study
    from search.summary import print_summary

    config = load_config(args.config, args.set)
    if args.address:
        config = config.model_copy(update={"workers": config.workers.model_copy(update={"address": args.address})})
    study = run_study(config, progress=not args.quiet)
    print_summary(config.study.folder, study)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from search.config import config_from_dict
    from search.records import CONFIG_FILE, read_config_snapshot
    from search.study import run_study
    from search.summary import print_summary

    folder = Path(args.folder)
    try:
        data = read_config_snapshot(folder)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    data["study"]["output_dir"] = str(folder)
    from search.config import apply_overrides

    config = config_from_dict(apply_overrides(data, args.set), str(folder / CONFIG_FILE))
    study = run_study(config, resume=True, progress=not args.quiet)
    print_summary(folder, study)
    return 0


def _status(args: argparse.Namespace) -> int:
    from search.summary import print_status

    print_status(Path(args.folder))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from search.config import load_config

    config = load_config(args.config, args.set)
    n = len(config.models.finetunes)
    print(f"{args.config}: ok ({config.objectives.mode} study '{config.study.name}', {n} fine-tunes, "
          f"methods {', '.join(config.space.methods)}, {config.sampler.name} sampler)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basin", description="Search model-merge recipes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="apply a merge recipe and write an HF model folder")
    p.add_argument("recipe", help="recipe YAML (basin format; convert mergekit files first)")
    p.add_argument("--out", required=True, help="output model folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="cpu", help="device to merge on, e.g. cuda (default: cpu)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickle (.bin) checkpoints; only for trusted sources")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_merge)

    p = sub.add_parser("convert", help="convert a recipe between basin and mergekit YAML")
    p.add_argument("file", help="a basin recipe or a mergekit config")
    p.add_argument("--to", required=True, choices=["mergekit", "basin"], help="target format")
    p.add_argument("--out", help="write here instead of standard output")
    p.set_defaults(func=_convert)

    p = sub.add_parser("run", help="run a study until its budget is spent")
    p.add_argument("config", help="study config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. budget.n_trials=20")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

    p = sub.add_parser("resume", help="continue a study up to its budget")
    p.add_argument("folder", help="the study folder (results/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. budget.n_trials=100 to extend it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_resume)

    p = sub.add_parser("status", help="trials done, failed, running; best so far; elapsed")
    p.add_argument("folder", help="the study folder")
    p.set_defaults(func=_status)

    p = sub.add_parser("validate", help="check a config without loading any model")
    p.add_argument("config", help="study config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MergeError, ConfigError, EvaluatorError) as exc:
        print(f"basin: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("basin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
