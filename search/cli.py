"""The `basin` command line: one subcommand per job, each a short function."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluators.protocol import EvaluatorError
from merging import MergeError
from search.config import ConfigError
from search.finalists import DEFAULT_FINALISTS
from search.loop import StudyStopped, Terminated

EXIT_USAGE = 2


def _merge(args: argparse.Namespace) -> int:
    from merging import export_merge, load_recipe
    from search.outputs import check_output

    recipe = load_recipe(args.recipe)
    check_output(args.out, _inputs(recipe))
    out = export_merge(
        recipe,
        args.out,
        force=args.force,
        device=args.device,
        kernels=args.kernels,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def _inputs(recipe) -> list[str]:
    """The model folders (or hub ids) a recipe reads."""
    return [p for p in (recipe.base, *(m.path for m in recipe.models)) if p]


def _top_names(recipe) -> list[str] | None:
    """The final norm and head tensors of the recipe's reference model, when it is at hand."""
    from merging import Checkpoint, MergeError
    from merging.layers import at_top

    if not Path(recipe.reference).expanduser().is_dir():
        return None  # a hub id: never download a model to name its tensors
    try:
        return [n for n in Checkpoint(recipe.reference).names if at_top(n)]
    except (MergeError, OSError, ValueError):
        return None  # not local: a conversion that needs the names says so


def _convert(args: argparse.Namespace) -> int:
    from merging import dump_recipe, recipe_from_dict, to_mergekit
    from merging.mergekit_yaml import from_mergekit_with_notes
    from merging.recipe import read_yaml

    data = read_yaml(args.file, "file")
    is_mergekit = isinstance(data, dict) and "merge_method" in data
    notes: list[str] = []
    if is_mergekit:
        recipe, notes = from_mergekit_with_notes(data, approximate=args.approximate)
    else:
        recipe = recipe_from_dict(data)
    for note in notes:  # what was dropped because it changes nothing, on stderr
        print(f"note: {note}", file=sys.stderr)
    if args.to == "mergekit":
        text = to_mergekit(recipe, approximate=args.approximate, top_names=_top_names(recipe))
    else:
        text = dump_recipe(recipe)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _run(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.loop import run_study
    from search.summary import print_summary

    config = load_config(args.config, args.set)
    if args.address:
        config = config.model_copy(
            update={"workers": config.workers.model_copy(update={"address": args.address})}
        )
    study = _study(lambda: run_study(config, progress=not args.quiet), config.study.folder)
    print_summary(config.study.folder, study)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from search.config import config_from_dict
    from search.loop import run_study
    from search.records import CONFIG_FILE, read_config_snapshot
    from search.summary import print_summary

    folder = Path(args.folder)
    try:
        data = read_config_snapshot(folder)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    data["study"]["output_dir"] = str(folder)
    from search.config import apply_overrides

    config = config_from_dict(apply_overrides(data, args.set), str(folder / CONFIG_FILE), args.set)
    study = _study(lambda: run_study(config, resume=True, progress=not args.quiet), folder)
    print_summary(folder, study)
    return 0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while a study ran: what was in flight is queued again, the rest saved."""

    def __init__(self, folder: Path, terminated: bool) -> None:
        self.folder, self.terminated = folder, terminated
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        super().__init__(
            f"{how}; finished trials are saved and the candidates in flight were queued again: "
            f"continue with `basin resume {folder}`"
        )


def _study(run: Callable[[], Any], folder: Path) -> Any:
    """Run a study, turning Ctrl-C, SIGTERM and a full disk into basin's messages."""
    try:
        return run()
    except KeyboardInterrupt as exc:
        raise Interrupted(folder, isinstance(exc, Terminated)) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskFull(
            f"no space left on the device writing {exc.filename or folder}; the trials finished "
            f"so far are saved in {folder}: free some space, then `basin resume {folder}`"
        ) from None


class DiskFull(RuntimeError):
    """A write failed for want of space; the message says what is safe and how to go on."""


def _status(args: argparse.Namespace) -> int:
    from search.summary import print_status

    print_status(Path(args.folder))
    return 0


def _attach(args: argparse.Namespace) -> int:
    from search.attach import attach

    folder, written = attach(args.url, args.study, Path(args.out or Path("results") / args.study))
    print(
        f"study '{args.study}' attached in {folder} ({written} trial records written); "
        f"now `basin status {folder}`, `basin pareto`, `report`, `export`, "
        f"or `basin resume {folder}` to run one more runner here"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    """What `basin run` checks before any worker starts, except what needs a hub this machine
    cannot reach."""
    from merging.checkpoint import is_hub_id
    from search import fidelity
    from search.config import load_config
    from search.setup import (
        check_models,
        check_models_and_tasks,
        check_tasks,
        check_values,
        search_sizes,
        unreachable_hub_models,
    )

    config = load_config(args.config, args.set)
    unchecked = []
    hub_models = unreachable_hub_models(config)
    if [m for m in hub_models if not is_hub_id(m)]:
        check_models(config)  # a missing local folder: the same error as run
    if hub_models:
        unchecked.append(
            f"models {', '.join(hub_models)}: no such local folder, and as hub ids neither cached "
            "nor reachable from here; `basin run` downloads them (needs the hub, and a token for "
            "gated models)"
        )
    tasks = check_tasks(config)
    if tasks.hub_datasets:
        by_dataset: dict[str, list[str]] = {}
        for task, dataset in tasks.hub_datasets.items():
            by_dataset.setdefault(dataset, []).append(task)
        named = [
            f"{d} ({', '.join(t[:2])}{f' and {len(t) - 2} more' if len(t) > 2 else ''})"
            for d, t in by_dataset.items()
        ]
        unchecked.append(
            f"the data of {', '.join(named)}: on the hub; the tasks' names, splits and metrics "
            "were checked from their definitions, `basin run` downloads the data"
        )
    sizes = None
    if not unchecked:
        # everything is here: the data too, exactly as run checks it
        _, split_sizes, config = check_models_and_tasks(config)
        sizes = search_sizes(config, split_sizes)
    if not hub_models and not args.headers_only:
        check_values(config, progress=not args.quiet)  # what a worker would refuse at its start
    from search.user_recipes import describe, read_user_recipes

    users = []  # the user's recipes: read, placed in the space (needs the base's layer count)
    if config.baselines.recipes and not hub_models:
        from search.folder import study_space

        users = read_user_recipes(config, study_space(config))
    n = len(config.models.finetunes)
    print(
        f"{args.config}: ok ({config.objectives.mode} study '{config.study.name}', {n} fine-tunes, "
        f"methods {', '.join(config.space.methods)}, {config.sampler.name} sampler)"
    )
    print(f"budget: {_budget_words(config.budget)}")
    print(f"multi-fidelity: {fidelity.describe(config, sizes)}")
    if (overlap := config.evaluator.overlap()) is not None:
        print(f"warning: {overlap}")
    if not hub_models:
        from search.memory import check_fits, gpu_capacity, memory_plan

        plan = memory_plan(config, *gpu_capacity(config))
        device = (
            config.models.device
            if config.workers.gpus_per_worker == 0 or config.models.device != "auto"
            else "cuda"
        )
        print(f"memory plan of each worker ({config.models.dtype} on {device}):")
        print("\n".join(plan.lines()))
        if (warning := check_fits(plan)) is not None:
            print(f"warning: {warning}")
    for user in users:
        for note in user.notes:
            print(f"note: {note}")
        print(f"baselines.recipes: {describe(user)}")
    for line in unchecked:
        print(f"not checked here: {line}")
    return 0


def _budget_words(budget) -> str:
    """The budget as the run will apply it: whichever limit comes first."""
    parts = []
    if budget.n_trials is not None:
        parts.append(f"{budget.n_trials} trials")
    if budget.items is not None:
        parts.append(f"{budget.items} scored items")
    if budget.timeout is not None:
        parts.append(f"{budget.timeout:g} s of search")
    return " or ".join(parts) + (", whichever comes first" if len(parts) > 1 else "")


def _pareto(args: argparse.Namespace) -> int:
    from search.folder import load_study_folder
    from search.pareto import kept_table, pareto_table

    _, study = load_study_folder(args.folder)
    if args.where or args.sort:
        print(kept_table(study, args.folder, args.where, args.sort or "mean"))
    else:
        print(pareto_table(study, top=args.top))
    return 0


def _report(args: argparse.Namespace) -> int:
    from search.report import write_report

    if args.finalists < 1:
        raise ConfigError(
            f"--finalists {args.finalists}: expected at least 1 (how many front members to score "
            "on the held-out split), e.g. --finalists 20"
        )
    named = _trial_numbers(args.trial)
    out = write_report(
        args.folder,
        trial=named[0] if named else None,
        named=named,
        finalists=args.finalists,
        score_heldout_split=not args.no_heldout,
        progress=not args.quiet,
    )
    print(f"report: {out}")
    return 0


def _trial_numbers(texts: list[str]) -> list[int]:
    """The trial numbers of --trial values, each one number or a comma list, in order, once each."""
    numbers: list[int] = []
    for text in texts:
        for part in text.split(","):
            if not part.strip().isdigit():
                raise ConfigError(
                    f"--trial {text!r}: expected a trial number or a comma list of them, "
                    "e.g. --trial 57 or --trial 3,57 (`basin pareto` lists them)"
                )
            if int(part) not in numbers:
                numbers.append(int(part))
    return numbers


def _export(args: argparse.Namespace) -> int:
    from merging import export_merge, to_mergekit
    from search.folder import load_study_folder, trial_recipe
    from search.outputs import check_output

    config, study = load_study_folder(args.folder)
    if not 0 <= args.trial < len(study.trials) or study.trials[args.trial].state.name != "COMPLETE":
        done = [t.number for t in study.trials if t.state.name == "COMPLETE"]
        raise ConfigError(
            f"trial {args.trial} is not a complete trial of this study; pick one of {done[:20]}"
            f"{' ...' if len(done) > 20 else ''} (`basin pareto {args.folder}` shows the best)"
        )
    recipe = trial_recipe(config, study.trials[args.trial])
    check_output(args.out, [*_inputs(recipe), args.folder])
    if args.format == "mergekit":
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(
                f"{out} is a folder; --format mergekit writes one YAML file: give a file name, "
                f"e.g. {out / 'recipe.yaml'}"
            )
        if out.exists() and not args.force:
            raise ConfigError(f"{out} already exists; choose another --out or pass --force")
        out.write_text(
            to_mergekit(recipe, approximate=args.approximate, top_names=_top_names(recipe))
        )
    else:
        device = args.device or "cpu"
        out = export_merge(
            recipe,
            args.out,
            force=args.force,
            device=device,
            kernels=config.models.kernels,
            allow_pickle=config.models.allow_pickle,
            progress=not args.quiet,
        )
    print(f"wrote {out}")
    return 0


def _repair(args: argparse.Namespace) -> int:
    from search import journal, records
    from search.folder import load_study_folder

    folder = Path(args.folder)
    path = folder / records.JOURNAL_FILE
    if not path.is_file():
        if (folder / records.CONFIG_FILE).is_file():
            storage = (records.read_config_snapshot(folder).get("study") or {}).get("storage")
            if storage:
                raise ConfigError(
                    f"{folder} keeps its study in a database ({records.redact(storage)}), not in "
                    f"a {records.JOURNAL_FILE}, so there is nothing to repair here"
                )
            raise ConfigError(
                f"{folder} has no {records.JOURNAL_FILE}: its journal is gone, so there is "
                f"nothing to repair; restore it from a copy (or a {records.JOURNAL_FILE}.bak-* "
                "in the folder)"
            )
        raise ConfigError(
            f"{folder} is not a study folder (no {records.JOURNAL_FILE}), so there is nothing to "
            "repair; give the folder `basin run` created"
        )
    repaired = journal.repair(folder)
    if repaired is None:
        print(f"{path} is healthy: every line is an operation; nothing changed")
    else:
        print(
            f"{path}: dropped {repaired.dropped} bad line{'s' * (repaired.dropped != 1)}, kept "
            f"{repaired.kept} operation{'s' * (repaired.kept != 1)}; the original is "
            f"{repaired.backup}"
        )
    try:
        _, study = load_study_folder(folder)
    except ConfigError as exc:
        if repaired is None:
            raise
        raise ConfigError(
            f"{exc}; the journal as it was before the repair: {repaired.backup}"
        ) from None
    n = len(study.get_trials(deepcopy=False))
    print(f"study '{study.study_name}' loads: {n} trial{'s' * (n != 1)}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from evaluators.zoo import build_zoo

    zoo = build_zoo(args.out, seed=args.seed, force=args.force, progress=not args.quiet)
    print(
        f"zoo in {zoo.root}: base {zoo.base.name}, fine-tunes {', '.join(zoo.finetunes)}, "
        f"tasks {', '.join(zoo.tasks)}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from evaluators.zoo import build_zoo
    from search.demo import DEMO_ZOO, load_demo_config
    from search.loop import run_study
    from search.pareto import pareto_table
    from search.report import write_report

    # fails before the build
    config = load_demo_config(args.out, args.set, zoo=DEMO_ZOO, generative=args.generative)
    print(f"1/3 building the toy zoo in {DEMO_ZOO} (reused when already built)")
    build_zoo(DEMO_ZOO, seed=0, progress=not args.quiet)
    print(f"2/3 running the demo study into {config.study.folder}")
    if args.fresh and config.study.folder.exists():
        import shutil

        shutil.rmtree(config.study.folder)
    study = run_study(
        config, resume=(config.study.folder / "config.yaml").is_file(), progress=not args.quiet
    )
    print()
    print(pareto_table(study))
    print("3/3 writing the report (held-out scores of the finalists and baselines)")
    report = write_report(config.study.folder, progress=not args.quiet)
    print(f"report: {report}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("basin-merge")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _add_set(p: argparse.ArgumentParser, example: str = "") -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=example or "override a config field, e.g. budget.n_trials=20",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basin", description="Search model-merge recipes.")
    parser.add_argument("--version", action="version", version=f"basin {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="apply a merge recipe and write an HF model folder")
    p.add_argument("recipe", help="recipe YAML (basin format; convert mergekit files first)")
    p.add_argument(
        "--out", required=True, help="output model folder (must not exist unless --force)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="cpu", help="device to merge on, e.g. cuda (default: cpu)")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "eager", "compiled"],
        help="merge kernels: compiled fuses each merge into one kernel (torch.compile); "
        "auto: compiled on CUDA, and on a CPU for models of 20M parameters or more",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle (.bin) checkpoints; only for trusted sources",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_merge)

    p = sub.add_parser("convert", help="convert a recipe between basin and mergekit YAML")
    p.add_argument("file", help="a basin recipe or a mergekit config")
    p.add_argument("--to", required=True, choices=["mergekit", "basin"], help="target format")
    p.add_argument("--out", help="write here instead of standard output")
    p.add_argument(
        "--approximate",
        action="store_true",
        help="convert methods that drop at random (dare_*, della*) "
        "although the weights will differ",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser("run", help="run a study until its budget is spent")
    p.add_argument("config", help="study config YAML")
    _add_set(p)
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

    p = sub.add_parser("resume", help="continue a study up to its budget")
    p.add_argument("folder", help="the study folder (results/<name>)")
    _add_set(p, "e.g. budget.n_trials=100 to extend it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_resume)

    p = sub.add_parser("status", help="trials done, failed, running; best so far; elapsed")
    p.add_argument("folder", help="the study folder")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "attach",
        help="make a study folder here for a study kept in a database (runs on other machines)",
    )
    p.add_argument(
        "url", help="the study's storage URL; a password only as ${VAR} (in single quotes)"
    )
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument(
        "--out",
        help="the folder to write (default results/<study>); run attach again to refresh it",
    )
    p.set_defaults(func=_attach)

    p = sub.add_parser("pareto", help="the Pareto front (or top trials) with the baselines")
    p.add_argument("folder", help="the study folder")
    p.add_argument("--top", type=int, default=5, help="rows for a single-objective study")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COND",
        help='keep the complete trials that meet it, e.g. "zoo_add/acc>=0.9 and zoo_rev/acc>=0.8" '
        "(a metric's name or a part naming one; >=, <=, >, <, ==); with their export commands",
    )
    p.add_argument(
        "--sort",
        metavar="KEY",
        help="with --where: order by mean (the objectives' mean, default) or by one metric",
    )
    p.set_defaults(func=_pareto)

    p = sub.add_parser("report", help="write report.html and figures into the study folder")
    p.add_argument("folder", help="the study folder")
    p.add_argument(
        "--trial",
        action="append",
        default=[],
        metavar="N",
        help="a trial to show and score on the held-out split besides the finalists; repeatable "
        "or a comma list, e.g. 3,57; the first is the recipe shown (default: best, or best mean "
        "on the front)",
    )
    p.add_argument(
        "--finalists",
        type=int,
        default=DEFAULT_FINALISTS,
        metavar="K",
        help="with several objectives, score at most K front members on the held-out split, "
        f"chosen to cover the front (default {DEFAULT_FINALISTS})",
    )
    p.add_argument(
        "--no-heldout", action="store_true", help="skip scoring finalists on the held-out split"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "export", help="write a trial's merge as an HF model folder (or mergekit YAML)"
    )
    p.add_argument("folder", help="the study folder")
    p.add_argument("--trial", type=int, required=True, help="trial number (see basin pareto)")
    p.add_argument(
        "--out", required=True, help="output folder (or YAML file with --format mergekit)"
    )
    p.add_argument(
        "--format",
        choices=["hf", "mergekit"],
        default="hf",
        help="hf: a loadable model folder (default); mergekit: the recipe as mergekit YAML",
    )
    p.add_argument(
        "--approximate",
        action="store_true",
        help="with --format mergekit: write dare_* / della* recipes "
        "although mergekit's draws differ",
    )
    p.add_argument("--device", help="merge on this device (default cpu)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "repair",
        help="rewrite a study's journal without its damaged lines, keeping the original "
        "(stop the study's runners first)",
    )
    p.add_argument("folder", help="the study folder")
    p.set_defaults(func=_repair)

    p = sub.add_parser("zoo", help="build the toy model zoo (tiny base, fine-tunes, lm-eval tasks)")
    p.add_argument("out", help="output folder, e.g. .zoo/seed0")
    p.add_argument("--seed", type=int, default=0, help="the zoo's seed (default 0, the demo's)")
    p.add_argument(
        "--force", action="store_true", help="rebuild even if a zoo with this seed exists"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_zoo)

    p = sub.add_parser(
        "demo",
        help="build the toy zoo, run the demo study (configs/demo.yaml), print the front, "
        "write the report",
    )
    p.add_argument("--out", help="study folder (default: the config's)")
    _add_set(p)
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo study first")
    p.add_argument(
        "--generative",
        action="store_true",
        help="the generative demo: answers written by the model, exact match, a carved split",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "validate",
        help="check a config, its models' headers and its tasks, as run does, before any run",
    )
    p.add_argument("config", help="study config YAML")
    _add_set(p)
    p.add_argument(
        "--headers-only",
        action="store_true",
        help="skip reading every tensor for NaN or inf (a few seconds per GB of models)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    import optuna

    args = build_parser().parse_args(argv)
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        args.quiet = True  # as tqdm itself reads it; lm-eval's bars and ours alike
    # basin prints its own progress and summaries
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return args.func(args)
    except (MergeError, ConfigError, EvaluatorError) as exc:
        print(f"basin: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StudyStopped, DiskFull) as exc:
        print(f"basin: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"basin: {exc}", file=sys.stderr)
        return 143 if exc.terminated else 130
    except KeyboardInterrupt:
        print(f"basin: interrupted; {_interrupted_here(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(
            f"basin: error: no space left on the device writing {exc.filename or 'a file'}; "
            "nothing half-written was kept: free some space and run the command again",
            file=sys.stderr,
        )
        return 1


def _interrupted_here(args: argparse.Namespace) -> str:
    """What an interrupt of this command left, and how to go on."""
    if args.command == "report":
        return (
            "the held-out scores finished so far are kept; `basin report "
            f"{args.folder}` continues from them"
        )
    return "nothing half-written was kept; run the command again"


if __name__ == "__main__":
    sys.exit(main())
