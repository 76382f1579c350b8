"""The `basin` command line: one subcommand per job, each a short function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from merging import MergeError

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MergeError as exc:
        print(f"basin: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("basin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
