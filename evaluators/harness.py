"""lm-eval adapter: score the candidate an engine holds on lm-eval tasks, many times, cheaply.

Built once per worker: the tasks are indexed, loaded and their docs materialised once; the engine
(evaluators/engines.py) gives the lm-eval LM it is scored through, built once and re-scored after
each swap of weights. Numbers equal
lm-eval's own `simple_evaluate` on the same model, tasks and split (bootstrap off).
"""

from __future__ import annotations

import difflib
import functools
import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evaluators import compat
from evaluators.carve import Carve
from evaluators.compat import disable_template_cache, enable_template_cache, template_cache_info
from evaluators.protocol import EvalResult, EvaluatorError

if TYPE_CHECKING:
    from evaluators.config import HarnessSection
    from evaluators.engines import Engine

__all__ = [
    "HarnessEvaluator",
    "disable_template_cache",
    "enable_template_cache",
    "template_cache_info",
]

Split = Literal["validation", "test"]
_SPLIT_FIELDS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}

# simple_evaluate's default seeds; re-applied before every call so a call never depends on the last.
_RANDOM_SEED, _NUMPY_SEED, _TORCH_SEED, _FEWSHOT_SEED = 0, 1234, 1234, 1234


@contextmanager
def _quiet(enabled: bool, level: int = logging.ERROR) -> Iterator[None]:
    """Silence lm-eval's progress bars and logs below `level` (and datasets' bars) for a block."""
    if not enabled:
        yield
        return
    import datasets

    compat.gate_tqdm_bars()
    token = compat.QUIET.set(True)
    logger = logging.getLogger("lm_eval")
    saved_level = logger.level
    logger.setLevel(max(level, saved_level))
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        logger.setLevel(saved_level)
        compat.QUIET.reset(token)


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed random/numpy/torch as simple_evaluate does, then restore the caller's RNG states."""
    import numpy as np
    import torch

    cuda = torch.cuda.is_initialized()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    random.seed(_RANDOM_SEED)
    np.random.seed(_NUMPY_SEED)
    torch.manual_seed(_TORCH_SEED)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# --- task loading -----------------------------------------------------------------------------


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."


@functools.cache
def _builtin_manager() -> Any:
    """lm-eval's index of its built-in tasks (several seconds to build), built once per process.

    Only the built-ins are shared: their files ship with lm-eval and do not change while it runs,
    unlike a user's include_path folder.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def _task_manager(names: Sequence[str], include_path: list[str], builtins: bool) -> Any:
    """A TaskManager that knows every name, indexing lm-eval's ~14,000 built-ins only if a name is
    not local."""
    from lm_eval.tasks import TaskManager

    if not include_path and not builtins:
        raise EvaluatorError("no tasks to search: give include_path, or allow builtin_tasks")
    local = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if local is not None and (not builtins or all(n in local.all_tasks for n in names)):
        manager = local
    elif include_path:
        manager = TaskManager(include_path=include_path, include_defaults=True)
    else:
        manager = _builtin_manager()
    for name in names:
        if name not in manager.all_tasks:
            local_names = local.all_tasks if local is not None else []
            where = (
                f" Known local tasks: {', '.join(local_names) or 'none'}"
                f" (in {', '.join(include_path)})."
                if include_path
                else " No include_path was given; pass include_path=<folder of task yaml files>"
                " for local tasks."
            )
            if not builtins:
                where += " lm-eval's built-in tasks were not searched (builtin_tasks=False)."
            raise EvaluatorError(f"unknown task {name!r}{_suggest(name, manager.all_tasks)}{where}")
    return manager


def _load_tasks(names: Sequence[str], include_path: list[str], builtins: bool) -> dict[str, Any]:
    """Load the named tasks with their data."""
    return dict(_task_manager(names, include_path, builtins).load(list(names)))


def _metric_keys(task_dict: dict[str, Any]) -> tuple[str, ...]:
    """Every "<task>/<metric>[,<filter>]" the loaded tasks (and their groups) report."""
    keys = []
    for name, task in task_dict["tasks"].items():
        filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
        keys += [_key(name, m, f) for f in filters for m in task.higher_is_better()]
    leaf_metrics = {k.split("/", 1)[1] for k in keys}
    keys += [f"{group}/{m}" for group in task_dict.get("groups", {}) for m in leaf_metrics]
    return tuple(keys)


def _direction(task_dict: dict[str, Any], key: str) -> bool:
    """lm-eval's higher_is_better for "<task>/<metric>" (a group takes its first leaf task's)."""
    keys = _metric_keys(task_dict)
    if key not in keys:
        same_task = [k for k in keys if k.split("/", 1)[0] == key.split("/", 1)[0]]
        raise EvaluatorError(
            f"unknown metric {key!r}{_suggest(key, same_task or keys)} "
            f"Known metrics: {', '.join(same_task or keys)}."
        )
    task_name, metric = key.split("/", 1)
    metric = metric.split(",", 1)[0]
    tasks = task_dict["tasks"]
    task = tasks.get(task_name) or next(iter(tasks.values()))
    return bool(task.higher_is_better().get(metric, True))


_LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


@dataclass(frozen=True)
class TaskDefinitions:
    """What the task definitions say, read without their data
    (evaluators/compat.py: load_definitions)."""

    directions: dict[str, bool]  # the asked metric keys -> higher is better
    hub_datasets: dict[str, str]  # task -> the hub dataset its data comes from (not a local file)


def check_task_definitions(
    tasks: Sequence[str],
    *,
    include_path: Sequence[str] = (),
    builtin_tasks: bool = True,
    split: Split = "validation",
    metrics: Sequence[str] = (),
) -> TaskDefinitions:
    """Unknown tasks, a split a task lacks and unknown metrics raise EvaluatorError, with the
    messages the evaluator itself gives, before any data is read."""
    paths = [str(Path(p).expanduser().resolve()) for p in include_path]
    with _quiet(True, level=logging.ERROR):
        definitions = compat.load_definitions(
            _task_manager(list(tasks), paths, builtin_tasks), list(tasks)
        )
    hub = {}
    for name, task in definitions["tasks"].items():
        _check_split(name, task, split)
        source = task.config.dataset_path
        if source and source not in _LOCAL_LOADERS and not Path(str(source)).exists():
            hub[name] = str(source)
    return TaskDefinitions({key: _direction(definitions, key) for key in metrics}, hub)


def _declared_splits(task: Any) -> dict[str, str]:
    config = task.config
    return {
        role: getattr(config, field)
        for role, field in _SPLIT_FIELDS.items()
        if getattr(config, field, None) is not None
    }


def _check_split(name: str, task: Any, split: Split) -> None:
    declared = _declared_splits(task)
    if split not in declared:
        available = ", ".join(f"{r} ({s!r})" for r, s in declared.items()) or "none"
        other = [r for r in declared if r in ("validation", "test")]
        raise EvaluatorError(
            f"task {name!r} has no {split} split; its config declares: {available}. "
            + (
                f"Choose split={other[0]!r} "
                "(with holdout: 0.3 to carve it into search and report items)"
                if other
                else f"Declare {_SPLIT_FIELDS[split]} in the task's yaml"
            )
            + "."
        )


def _force_split(name: str, task: Any, split: Split) -> None:
    """Make lm-eval score `split`; by itself it scores test_split whenever one is declared."""
    _check_split(name, task, split)
    if split == "validation":
        # Exactly what lm-eval does for a task that declares no test split.
        task.set_config("test_split", None)
        if task.has_test_docs():
            raise EvaluatorError(
                f"task {name!r} ({type(task).__name__}) always scores its test split; "
                "it cannot be scored on validation"
            )


def _select(
    items: Sequence[int], limit: int | None, sample_seed: int | None, name: str
) -> list[int]:
    """Item indices to score among `items`: all, the first `limit`, or `limit` drawn once from
    `sample_seed`."""
    if limit is None:
        return list(items)
    if sample_seed is None:
        return list(items[:limit])
    # Seeded by (seed, task) so a task's sample does not depend on which other tasks are listed;
    # kept in draw order so any prefix of it is itself a uniform sample.
    return random.Random(f"{sample_seed}:{name}").sample(items, min(limit, len(items)))


def _check_count(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise EvaluatorError(f"{what} must be a positive int or None, got {value!r}")


def _key(task: str, metric: str, filter_name: str) -> str:
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric},{filter_name}"


class HarnessEvaluator:
    """Scores an engine's candidate on lm-eval tasks; built once per worker, called once per
    candidate.

    section: what to score and how, as a study's config says it: the tasks (or groups), looked up
        in its include_path first (only if one is not found there, and builtin_tasks is on, are
        lm-eval's built-in tasks indexed, ~15 s); batch_size for HFLM; sample_seed (see `limit`);
        num_fewshot (None: the task's own, else 0), apply_chat_template (a name picks one of the
        tokenizer's templates), fewshot_as_multiturn and system_instruction, as simple_evaluate's;
        gen_kwargs, merged into every generate_until task's own, as simple_evaluate does.
    split: "validation" or "test", the one this role scores; a task lacking it is an error.
    carve: score one part of a seeded cut of the split (evaluators/carve.py) before `limit` applies.
    order_seed: put each task's items in an order drawn from this seed (and the task name), so that
        any prefix is a uniform sample, and let `evaluate(items=...)` score a slice of that order
        (multi-fidelity rungs); each item's few-shot examples are then drawn from a seed of its own,
        so an item scores the same in whichever slice it comes.
    limit: score only the first `limit` items of each task (None: the section's). With the
        section's `sample_seed`, score instead `limit` items drawn at random once, at construction,
        from that seed (and the task name); every call scores the same items, and the per-call
        `limit` of `evaluate` takes a prefix.
    metrics: report only these, as "<task>/<metric>" or a bare metric name for every task.
    cache_templates: memoise lm-eval's jinja compilation (see `compat.enable_template_cache`).
    cache_tokens: memoise the wrapper's tokenization of request strings
        (see `compat.memoise_tok_encode`).
    verbose: keep lm-eval's per-call progress bars and logs.
    """

    def __init__(
        self,
        section: HarnessSection,
        *,
        split: Split,
        carve: Carve | None = None,
        order_seed: int | None = None,
        limit: int | None = None,
        metrics: Sequence[str] | None = None,
        cache_templates: bool = True,
        cache_tokens: bool = True,
        verbose: bool = False,
    ) -> None:
        if split not in ("validation", "test"):
            raise EvaluatorError(f"split must be 'validation' or 'test', got {split!r}")
        limit = section.limit if limit is None else limit
        _check_count(limit, "limit")
        sample_seed = section.sample_seed
        if sample_seed is not None and limit is None:
            raise EvaluatorError("sample_seed draws `limit` items at random; give limit too")
        paths = [str(Path(p).expanduser().resolve()) for p in section.include_paths]
        for path in paths:
            if not Path(path).is_dir():
                raise EvaluatorError(f"include_path {path} is not a folder of task yaml files")

        batch_size = section.batch_size
        if batch_size != "auto":
            _check_count(batch_size, "batch_size")
        self.split: Split = split
        self.batch_size = batch_size
        self.chat = {
            "apply_chat_template": section.apply_chat_template,
            "fewshot_as_multiturn": section.fewshot_as_multiturn,
            "system_instruction": section.system_instruction,
        }
        self.verbose = verbose
        self.cache_tokens = cache_tokens
        compat.check_lm_eval()
        if cache_templates:
            enable_template_cache()

        with _quiet(not verbose, level=logging.WARNING):  # keep warnings about task configs
            self._task_dict = _load_tasks(list(section.tasks), paths, section.builtin_tasks)
        self._item_ids: dict[str, tuple[int, ...]] = {}
        self._docs: dict[str, list[Any]] = {}
        self.order_seed = order_seed
        self.split_sizes: dict[str, int] = {}  # items in each task's split, before carve and limit
        for name, task in self._task_dict["tasks"].items():
            _force_split(name, task, split)
            all_docs = list(task.eval_docs)  # process_docs runs here, once
            self.split_sizes[name] = len(all_docs)
            items = carve.ids(len(all_docs), name) if carve else list(range(len(all_docs)))
            ids = _select(items, limit, sample_seed, name)
            if order_seed is not None:
                random.Random(f"order:{order_seed}:{name}").shuffle(ids)
            self._docs[name] = [all_docs[i] for i in ids]
            compat.pin_docs(task, split, self._docs[name])
            self._item_ids[name] = tuple(ids)
            self._set_fewshot(task, section.num_fewshot)
            if order_seed is not None and task.get_config("num_fewshot"):
                compat.fewshot_per_item(task, order_seed)
            gen_kwargs = section.gen_kwargs
            if gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
        self._metric_filter = self._resolve_metrics(metrics)

    # -- construction helpers -----------------------------------------------------------------

    @staticmethod
    def _set_fewshot(task: Any, num_fewshot: int | None) -> None:
        # Same rule as simple_evaluate: a config's explicit 0 wins; otherwise ours, else 0.
        configured = task.get_config("num_fewshot")
        if num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every "<task>/<metric>" this evaluator can report (before any `metrics` filter)."""
        return _metric_keys(self._task_dict)

    def higher_is_better(self, key: str) -> bool:
        """lm-eval's direction for "<task>/<metric>" (a group takes its first leaf task's)."""
        return _direction(self._task_dict, key)

    def _resolve_metrics(self, metrics: Sequence[str] | None) -> frozenset[str] | None:
        if metrics is None:
            return None
        known = self.metric_keys
        bare = {k.split("/", 1)[1] for k in known}
        chosen = set()
        for wanted in metrics:
            if wanted in known:
                chosen.add(wanted)
            elif wanted in bare:
                chosen.update(k for k in known if k.split("/", 1)[1] == wanted)
            else:
                raise EvaluatorError(
                    f"unknown metric {wanted!r}{_suggest(wanted, [*known, *bare])} "
                    f"Known metrics: {', '.join(known)}."
                )
        return frozenset(chosen)

    # -- public -------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """The leaf task names this evaluator scores."""
        return tuple(self._task_dict["tasks"])

    @property
    def item_counts(self) -> dict[str, int]:
        """Per task, the number of items scored (after carve and limit)."""
        return {name: len(ids) for name, ids in self._item_ids.items()}

    def check_item_means(self, keys: Sequence[str]) -> None:
        """Each key must add up from per-item scores: a task's mean of per-item scores, or a group's
        mean of such task metrics (as mmlu aggregates its subjects)."""
        from lm_eval.api.metrics import mean

        tasks, groups = self._task_dict["tasks"], self._group_means
        for key in keys:
            task_name, metric = key.split("/", 1)
            leaves = [key]
            why = None
            if task_name not in tasks:
                leaves = groups.get(key, ([], True))[0]
                if not leaves:
                    why = (
                        "is a group's metric that lm-eval does not aggregate "
                        "as a mean of its tasks'"
                    )
            for leaf in leaves:
                leaf_task, leaf_metric = leaf.split("/", 1)
                aggregate = tasks[leaf_task].aggregation().get(leaf_metric.split(",", 1)[0])
                if aggregate is not mean and why is None:
                    why = (
                        f"is aggregated by {getattr(aggregate, '__name__', aggregate)}"
                        f"{f' in task {leaf_task!r}' if leaf != key else ''}, "
                        "not as a mean of per-item scores"
                    )
            if why:
                raise EvaluatorError(
                    "fidelity scores items in rungs and adds up per-item scores, "
                    f"but {key!r} {why}; name objectives that are a task's per-item mean "
                    "(such as acc or exact_match), or remove the fidelity section"
                )

    @functools.cached_property
    def _group_means(self) -> dict[str, tuple[list[str], bool]]:
        """Every group key lm-eval aggregates as a mean: its leaf tasks' keys and weight_by_size."""
        out = {}
        leaf_keys = _metric_keys({"tasks": self._task_dict["tasks"]})
        for name, group in self._task_dict.get("groups", {}).items():
            leaves = [t.task_name for t in group.get_all_tasks()]
            for agg in getattr(group, "aggregate_metric_list", None) or []:
                if agg.aggregation != "mean":
                    continue
                filters = agg.filter_list or sorted(
                    {
                        k.split(",", 1)[1] if "," in k else "none"
                        for k in leaf_keys
                        if k.split("/", 1)[1].split(",", 1)[0] == agg.metric
                    }
                )
                for filter_name in filters:
                    out[_key(name, agg.metric, filter_name)] = (
                        [_key(t, agg.metric, filter_name) for t in leaves],
                        bool(agg.weight_by_size),
                    )
        return out

    def item_metrics(
        self, scores: dict[str, Sequence[float]]
    ) -> tuple[dict[str, float], dict[str, list[list[float]]]]:
        """Metrics from the per-item scores of the leaf tasks, as lm-eval computes them: each task's
        mean, and each group's aggregate of those. With them, each key's per-item scores as one list
        per leaf task (a task key: its own; a group key: its tasks', in order)."""
        metrics = {k: sum(v) / len(v) for k, v in scores.items() if v}
        parts = {k: [list(v)] for k, v in scores.items()}
        for key, (leaves, by_size) in self._group_means.items():
            have = [leaf for leaf in leaves if leaf in metrics]
            if not have:
                continue
            sizes = [len(scores[leaf]) if by_size else 1 for leaf in have]
            metrics[key] = sum(metrics[leaf] * n for leaf, n in zip(have, sizes)) / sum(sizes)
            parts[key] = [list(scores[leaf]) for leaf in have]
        return metrics, parts

    @property
    def item_ids(self) -> dict[str, tuple[int, ...]]:
        """Per task, the split's item indices scored, in per-item order."""
        return dict(self._item_ids)

    def evaluate(
        self,
        engine: Engine,
        *,
        limit: int | None = None,
        per_item: bool = False,
        items: tuple[int, int] | None = None,
    ) -> EvalResult:
        """Score the candidate `engine` holds (call again after it takes another).

        items: (start, stop) scores only that slice of each task's items (needs `order_seed`); the
            metrics are then the slice's own, and per-item scores come with them.
        """
        _check_count(limit, "limit")
        if items is None:
            return self._evaluate(engine, limit, per_item)
        start, stop = items
        if self.order_seed is None or not 0 <= start < stop:
            raise EvaluatorError(
                f"items=(start, stop) needs order_seed and 0 <= start < stop; got {items!r}"
            )
        sliced = {name: docs[start:stop] for name, docs in self._docs.items()}
        tasks = self._task_dict["tasks"]
        try:
            for name, docs in sliced.items():
                compat.pin_docs(tasks[name], self.split, docs)
            return self._evaluate(engine, limit, True, skip={n for n, d in sliced.items() if not d})
        finally:
            for name, docs in self._docs.items():
                compat.pin_docs(tasks[name], self.split, docs)

    def _evaluate(
        self,
        engine: Engine,
        limit: int | None,
        per_item: bool,
        skip: set[str] = frozenset(),
    ) -> EvalResult:
        import torch
        from lm_eval.evaluator import evaluate as lm_eval_evaluate

        task_dict = self._task_dict
        if skip:  # tasks with no items in the slice (fewer items than the slice starts at)
            task_dict = {
                **task_dict,
                "tasks": {n: t for n, t in task_dict["tasks"].items() if n not in skip},
            }
        lm = self._wrap(engine)
        for task in task_dict["tasks"].values():
            task.set_fewshot_seed(seed=_FEWSHOT_SEED)  # else the fewshot draw moves on every call
        with torch.no_grad(), _quiet(not self.verbose), _seeded():
            out = lm_eval_evaluate(
                lm=lm,
                task_dict=task_dict,
                limit=limit,
                # lm-eval caches keyed on requests, not weights: both stay off.
                cache_requests=False,
                rewrite_requests_cache=False,
                bootstrap_iters=0,
                log_samples=per_item,
                write_out=False,
                **self.chat,
            )
        if out is None:
            raise EvaluatorError("lm-eval returned no results (not rank 0 of a distributed run)")
        return self._to_result(out, per_item)

    # -- per call -----------------------------------------------------------------------------

    def _wrap(self, engine: Engine) -> Any:
        """The engine's lm-eval LM, with its tokenization memoised the first time it is seen."""
        with _quiet(not self.verbose):  # HFLM warns about being given a model object: we mean to
            lm = engine.lm(self.batch_size)
        memoised = hasattr(getattr(lm, "tok_encode", None), "cache_info")
        if self.cache_tokens and engine.kind == "hf" and not memoised:
            compat.memoise_tok_encode(lm)
        return lm

    def _keep(self, key: str) -> bool:
        return self._metric_filter is None or key in self._metric_filter

    def _to_result(self, out: dict[str, Any], per_item: bool) -> EvalResult:
        metrics: dict[str, float] = {}
        flags: dict[str, bool] = {}
        directions = out.get("higher_is_better", {})
        for name, row in out["results"].items():
            for field, value in row.items():
                if "," not in field or "_stderr," in field or not isinstance(value, Real):
                    continue
                metric, filter_name = field.split(",", 1)
                key = _key(name, metric, filter_name)
                flag = directions.get(name, {}).get(metric)
                if flag is None or not self._keep(key):
                    continue  # a group mixing directions has none to optimise
                metrics[key] = float(value)
                flags[key] = bool(flag)
        items = self._per_item(out.get("samples", {}), metrics) if per_item else None
        return EvalResult(metrics=metrics, higher_is_better=flags, per_item=items)

    @staticmethod
    def _per_item(
        samples: dict[str, list[dict[str, Any]]], metrics: dict[str, float]
    ) -> dict[str, tuple[float, ...]]:
        scores: dict[str, list[float]] = {}
        skipped: set[str] = set()
        for name, rows in samples.items():
            for row in sorted(rows, key=lambda r: r["doc_id"]):
                for metric in row.get("metrics", []):
                    key = _key(name, metric, row.get("filter", "none"))
                    value = row.get(metric)
                    if key not in metrics or not isinstance(value, Real):
                        skipped.add(key)  # e.g. corpus-level metrics whose items are tuples
                        continue
                    scores.setdefault(key, []).append(float(value))
        return {k: tuple(v) for k, v in scores.items() if k not in skipped}
