"""The names of what basin stores on Optuna trials and studies (their user attrs), in one place.

Everything here outlives the process that wrote it: in the journal file or the database, where a
resumed run, another runner, `basin attach` and the report read it back. Renaming one breaks every
study stored before, so a name here changes only with a way to read the old one.
"""

from __future__ import annotations

from typing import Any

# --- on a trial ---------------------------------------------------------------------------------
# the baseline's name (alone:<model>, uniform, ...); absent on searched trials
BASELINE = "baseline"
# a recipe of baselines.recipes outside the search space: the recipe itself (recipe_to_dict), merged
# instead of one rebuilt from params (the trial has none), and why it is outside
RECIPE = "recipe"
OUTSIDE = "outside_space"
RECIPE_FILE = "recipe_file"  # a baseline from baselines.recipes: the file it was read from
RUNNER = "runner"  # {"host", "pid"} of the run that asked for the trial
RETRY_OF = "retry_of"  # the number of the failed trial whose params this one runs again
LOST_WORKER_RETRY = "lost_worker_retry"  # queued again once because its worker died
TIMED_OUT = "timed_out"  # stopped for workers.candidate_timeout
ERROR = "error"  # why the trial failed
METRICS = "metrics"  # "<task>/<metric>" -> value, on the search split
MERGE_S = "merge_s"
EVAL_S = "eval_s"
WORKER = "worker"  # host:pid/index of the worker that scored it
NODE = "node"  # the Ray node that worker ran on
# seconds: "busy_s" from dispatch to the worker's end of it; "free_s" the worker stood free before
# the dispatch (since it ended its previous candidate, in the same run), "free_for_proposal_s" the
# part of that spent waiting for the proposal; "in_order" whether proposals were made in trial
# order (one worker, or sampler.reproducible) (search/summary.py `driver_line`)
WORKER_TIME = "worker_time"
ITEMS = "items"  # items scored, summed over the tasks (the items budget counts these)
ITEMS_PER_TASK = "items_per_task"  # multi-fidelity: items scored per task
RUNG = "rung"  # multi-fidelity: the last rung scored (0 is the first)
RUNG_STOP = "rung_stop"  # multi-fidelity: items per task scored up to that rung
PROMOTED_TO = "promoted_to"  # multi-fidelity: items per task it was promoted to (None: all)
ITEM_SCORES = "item_scores"  # multi-fidelity: per objective, per-item scores up to the last rung

# --- on a study ---------------------------------------------------------------------------------
DIRECTIONS = "directions"  # each objective's, as the config or the metric gives it
OBJECTIVE_KEYS = "objective_keys"  # each objective's "<task>/<metric>"
SEARCH_ITEMS = "search_items"  # items per task the search scores (after carve and limit)
SPLIT_SIZES = "split_sizes"  # items per task of the search split before carving (the carve's input)
NUM_LAYERS = "num_layers"  # of the base model: the search space's depth, without the models at hand
RUNS = "runs_started"  # runs and proposal processes that opened the study: seeds differ
CONFIG = "config"  # the study's config: `basin attach` rebuilds a study folder from it
BASELINES_ENQUEUED = "baselines_enqueued"  # set once every baseline is queued
ELAPSED_S = "elapsed_s"  # search time over every run of the study
# a candidate proposed ahead that no worker took (the budget ended, or the run was stopped): failed
# and queued again, never run; summaries do not count it as failed
NOT_RUN = "not_run"


def failed(trial: Any) -> bool:
    """A FAIL trial that ran: not one proposed ahead and never run (NOT_RUN)."""
    return trial.state.name == "FAIL" and not trial.user_attrs.get(NOT_RUN)
