"""Build the toy zoo: a tokenizer, a tiny Llama base, one fine-tune per skill, lm-eval tasks.

What gets built (``Settings`` holds every knob; the seed picks data and init):

* a word-level HF tokenizer over the synthetic language (``skills.vocabulary``);
* ``base/``: a ``LlamaForCausalLM`` (hidden 96, 4 layers, 3 heads of 32, MLP 192,
  untied embeddings, 64 positions; 373,152 parameters) pretrained 1,200 steps
  on the mixture of the four skills of ``skills.py`` (add, succ, rev, sort),
  where 90% of the hard-region lines show the skill's systematic mistake;
* ``ft_<skill>/``: one fine-tune per skill on clean lines of that skill only,
  of deliberately unequal strength (AdamW; add 250 steps at lr 1.5e-3, succ 150
  at 1e-3, rev 200 at 1e-3, sort 300 at 1e-3);
* ``tasks/``: lm-eval yamls ``zoo_<skill>`` over ``data/<skill>_{validation,test}.jsonl``
  and the groups ``zoo_validation`` / ``zoo_test`` (see ``tasks.py``);
* ``heldout.txt``: clean lines of the skill mixture, one example per line, for
  perplexity (the models saw running text in 64-token windows);
* ``zoo.json``: the manifest (``manifest.py``), written last.

Why merging matters (validation split, checked on seeds 0-3): the base prefers
the mistake in every hard region and is right elsewhere; each fine-tune is the
best model on its own skill (1.00) and worse than the base on at least one
other skill (it forgets); the fixed merge below beats every single fine-tune
on the mean accuracy over the four skills by 11-20 points (seed 0: 0.753 vs
0.609 for the best fine-tune, 0.386 for the base).

The fixed merge ("the reasonable fixed merge"; tests/test_zoo.py recomputes it)
is task arithmetic over all four fine-tunes with equal weights, per tensor::

    merged = B + 0.5 * sum_k (M_k - B)

i.e. ``lambda = 0.5`` with ``w_k = 1`` (the same as ``lambda = 2`` with
``w_k = 1/4``). For comparison, on seeds 0-3: TIES (per tensor: keep each task
vector's top 70% entries by magnitude, elect each entry's sign from the sum of
the trimmed vectors, average the entries that agree with it, ``B + 1.0 *
mixed``) beats every fine-tune by 6-18 points; the uniform average of the
fine-tunes (``lambda = 0.25``) only partly fixes the hard regions and lands
within about 6 points of the best fine-tune (below it on one seed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from .manifest import (
    FORMAT_VERSION,
    Zoo,
    missing_files,
    read_manifest,
    write_manifest,
    zoo_from_manifest,
)
from .skills import SKILLS, Skill, mixture_text, split_items, vocabulary
from .tasks import data_files, task_name, write_jsonl, write_task_files
from .tokenizer import save_tokenizer, word_level_tokenizer

# The fixed merge documented above: task arithmetic B + MERGE_LAMBDA * sum_k T_k.
MERGE_LAMBDA = 0.5
# Bump when the build procedure changes what it writes, so older zoos are rebuilt.
BUILD_REVISION = 3


@dataclass(frozen=True)
class FinetuneSettings:
    """How long and how hard one skill's fine-tune trains (AdamW, cosine decay)."""

    steps: int
    lr: float


def _default_finetunes() -> dict[str, FinetuneSettings]:
    # Unequal strengths on purpose: they give the fine-tunes different amounts
    # of forgetting, so per-model weights in a merge recipe matter. add and sort
    # forget least per step, so they train longest.
    return {
        "add": FinetuneSettings(steps=250, lr=1.5e-3),
        "succ": FinetuneSettings(steps=150, lr=1e-3),
        "rev": FinetuneSettings(steps=200, lr=1e-3),
        "sort": FinetuneSettings(steps=300, lr=1e-3),
    }


@dataclass(frozen=True)
class Settings:
    """Everything besides the seed that shapes a zoo (hashed into zoo.json)."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 3  # head_dim 32: the smallest vLLM's CPU attention takes
    max_positions: int = 64  # also the perplexity window the models were trained on
    batch_size: int = 64
    pretrain_steps: int = 1200
    pretrain_lr: float = 3e-3
    warmup_steps: int = 50
    stream_every: int = 4  # every 4th pretraining batch is running text ...
    stream_rows: int = 8  # ... of this many rows of max_positions tokens
    mistake_rate: float = 0.9  # share of the systematic mistake inside hard regions
    finetunes: dict[str, FinetuneSettings] = field(default_factory=_default_finetunes)
    items_per_split: int = 200
    heldout_lines: int = 2000
    # One thread: CPU kernels give bit-identical weights for a fixed thread count,
    # and one thread is also the fastest on a 2-core machine shared with other work.
    threads: int = 1

    def digest(self, seed: int) -> str:
        blob = {
            "format_version": FORMAT_VERSION,
            "build_revision": BUILD_REVISION,
            "seed": seed,
            **asdict(self),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- pieces


def make_tokenizer():
    """A word-level HF tokenizer over the synthetic language (tokens are space separated)."""
    return word_level_tokenizer(vocabulary())


def make_config(settings: Settings, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _rng(seed: int, purpose: str) -> random.Random:
    """An independent, platform-stable stream per purpose (items, pretraining, ...)."""
    return random.Random(f"{seed}:{purpose}")


def _batches(
    rng: random.Random,
    skills: list[Skill],
    mistake_rate: float,
    vocab: dict[str, int],
    batch_size: int,
    stream_every: int = 0,
    stream_rows: int = 0,
    stream_len: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches (input ids, labels); padding is not scored.

    Most batches hold one example per row, starting at position 0, because
    lm-eval scores every prompt from position 0 without BOS (and one example per
    row learns the skills several times faster than packed rows). Every
    ``stream_every``-th batch instead holds ``stream_rows`` rows of running text
    (whole examples packed to ``stream_len`` tokens), which is what the
    perplexity evaluator reads.
    """
    pad = vocab["<pad>"]

    def line() -> list[int]:
        return [vocab[w] for w in mixture_text(rng, skills, mistake_rate).split()]

    step = 0
    while True:
        step += 1
        if stream_every and step % stream_every == 0:
            rows = []
            for _ in range(stream_rows):
                tokens = line()
                while len(tokens) < stream_len:
                    tokens += line()
                rows.append(tokens[:stream_len])
        else:
            rows = [line() for _ in range(batch_size)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, tokens in enumerate(rows):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            labels[i, : len(tokens)] = ids[i, : len(tokens)]
        yield ids, labels


def _train(
    model,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int,
    desc: str,
    progress: bool,
) -> float:
    """AdamW with linear warmup and cosine decay to a tenth; returns the last loss."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in bar:
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    model.eval()
    return loss_value


@contextmanager
def _quiet_build(threads: int):
    """Fix the torch thread count and hide transformers' per-save progress bars; restore both."""
    from transformers.utils import logging as hf_logging

    old_threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if bars:
            hf_logging.enable_progress_bar()


def _skills(settings: Settings) -> list[Skill]:
    skills = [s for s in SKILLS if s.name in settings.finetunes]
    if [s.name for s in skills] != list(settings.finetunes):
        raise ValueError(
            f"Settings.finetunes must name skills in the order {[s.name for s in SKILLS]}, "
            f"got {list(settings.finetunes)}"
        )
    return skills


def write_task_data(
    root: str | Path,
    seed: int = 0,
    settings: Settings | None = None,
    final_root: str | Path | None = None,
) -> list[str]:
    """Write the jsonl splits, task yamls and heldout.txt of a zoo into ``root``.

    Depends on the seed and settings only (no training), so it is cheap. The
    yamls point at ``final_root`` (default ``root``), where the zoo will live.
    Returns the written data files, relative to ``root``.
    """
    settings = settings or Settings()
    root = Path(root)
    final = Path(final_root) if final_root is not None else root
    skills = _skills(settings)
    written = []
    for skill in skills:
        val, test = split_items(skill, _rng(seed, f"items:{skill.name}"), settings.items_per_split)
        for split, items in (("validation", val), ("test", test)):
            path = data_files(root, skill.name)[split]
            write_jsonl(path, items)
            written.append(str(path.relative_to(root)))
    write_task_files(root, final.resolve(), [s.name for s in skills])
    rng = _rng(seed, "heldout")
    lines = [mixture_text(rng, skills, 0.0) for _ in range(settings.heldout_lines)]
    (root / "heldout.txt").write_text("\n".join(lines) + "\n")
    return written


# ----------------------------------------------------------------------------- build


def _build_into(tmp: Path, final: Path, seed: int, settings: Settings, progress: bool) -> dict:
    """Build every file of the zoo into ``tmp``; return the manifest record."""
    from transformers import LlamaForCausalLM

    started = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[zoo] {msg}", flush=True)

    skills = _skills(settings)
    data = write_task_data(tmp, seed, settings, final_root=final)
    tokenizer = make_tokenizer()
    vocab = tokenizer.get_vocab()

    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(settings, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"base: {n_params:,} parameters, pretraining {settings.pretrain_steps} steps")
    batches = _batches(
        _rng(seed, "pretrain"),
        skills,
        settings.mistake_rate,
        vocab,
        settings.batch_size,
        settings.stream_every,
        settings.stream_rows,
        settings.max_positions,
    )
    loss = _train(
        model,
        batches,
        settings.pretrain_steps,
        settings.pretrain_lr,
        settings.warmup_steps,
        "pretrain",
        progress,
    )
    say(f"base: final loss {loss:.3f} ({time.perf_counter() - started:.0f}s)")
    _save(model, tokenizer, tmp / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    finetunes = {}
    for skill in skills:
        ft = settings.finetunes[skill.name]
        model.load_state_dict(base_state)  # every fine-tune starts from the base
        batches = _batches(
            _rng(seed, f"finetune:{skill.name}"), [skill], 0.0, vocab, settings.batch_size
        )
        warmup = min(settings.warmup_steps, ft.steps // 5)
        loss = _train(model, batches, ft.steps, ft.lr, warmup, f"finetune {skill.name}", progress)
        folder = f"ft_{skill.name}"
        _save(model, tokenizer, tmp / folder)
        finetunes[skill.name] = folder
        say(
            f"fine-tune {skill.name}: {ft.steps} steps at lr {ft.lr:g}, final loss {loss:.3f} "
            f"({time.perf_counter() - started:.0f}s)"
        )

    seconds = time.perf_counter() - started
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "settings_hash": settings.digest(seed),
        "settings": asdict(settings),
        "root": str(final),
        "base": "base",
        "finetunes": finetunes,
        "tasks_dir": "tasks",
        "tasks": [task_name(s.name) for s in skills],
        "heldout_text": "heldout.txt",
        "data_files": data,
        "parameters": n_params,
        "merge": {"method": "task_arithmetic", "lambda": MERGE_LAMBDA, "weights": "1 each"},
        "build_seconds": round(seconds, 1),
    }


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)


def _reusable(root: Path, seed: int, settings: Settings) -> dict | None:
    """The manifest of a complete zoo built with this seed and settings, else None."""
    try:
        record = read_manifest(root)
    except ValueError:
        return None
    if record.get("settings_hash") != settings.digest(seed):
        return None
    if missing_files(zoo_from_manifest(root, record), record):
        return None
    return record


def build_zoo(
    out_dir: str | Path,
    seed: int = 0,
    *,
    force: bool = False,
    progress: bool = True,
    settings: Settings | None = None,
) -> Zoo:
    """Build the toy zoo into ``out_dir``, or return the one already there.

    A complete zoo built earlier with the same seed and settings is reused
    unless ``force``. The build happens in a temporary sibling folder renamed
    into place at the end, so an interrupted build never looks complete. About
    2-3 minutes on a 2-core CPU. Processes asking for the same folder at once
    take turns (a file lock beside it): the second reuses what the first built
    instead of replacing the zoo under it.
    """
    settings = settings or Settings()
    root = Path(out_dir).resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}-build.lock"):
        return _build_or_reuse(root, seed, force, progress, settings)


def _build_or_reuse(root: Path, seed: int, force: bool, progress: bool, settings: Settings) -> Zoo:
    record = None if force else _reusable(root, seed, settings)
    if record is not None:
        # Task files depend on the location and the skills only: refreshed (written where they
        # differ) so that a moved zoo points at its new place and an older zoo gains new tasks.
        write_task_files(root, root, list(record["finetunes"]))
        if Path(record["root"]) != root:
            record["root"] = str(root)
            write_manifest(root, record)
        return zoo_from_manifest(root, record)

    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _quiet_build(settings.threads):
            record = _build_into(tmp, root, seed, settings, progress)
        write_manifest(tmp, record)  # last: its presence marks a finished build
        if root.exists():
            trash = root.parent / f".{root.name}.old-{os.getpid()}"
            root.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[zoo] built {root} in {record['build_seconds']:.0f}s", flush=True)
    return zoo_from_manifest(root, record)
