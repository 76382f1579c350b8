"""Per-candidate evaluation time with the hf and the vllm engine, on the same candidates.

Both engines start once on the zoo's base (the worker's way) and score the same merged candidates
on two task sets of the demo zoo: its four generative tasks (the model writes each answer, greedy,
lm-eval's generate_until) and its four multiple-choice tasks (loglikelihood of each choice). Each
candidate is swapped in once and scored on both sets, as a worker scores a study's tasks. The
script prints the engine's start, the mean seconds per candidate of each task set's evaluation,
the ratio vllm / hf from this one run, and the swap (merge + load; for vllm also its prefix-cache
reset) as a share of the whole candidate. It also checks that both engines gave the same per-item
scores. Goals on a CPU: generative <= 0.2x, multiple choice <= 1x, swap <= 5% of a candidate.

    .venv/bin/python tests/benchmarks/bench_engines.py [--zoo DIR] [--candidates 4] [--device cpu]
    .venv/bin/python tests/benchmarks/bench_engines.py --model random --max-gen-toks 32
    .venv/bin/python tests/benchmarks/bench_engines.py --model random --num-fewshot 5 \
        --block-size 32                        # few-shot prompts: choices share cached contexts
    .venv/bin/python tests/benchmarks/bench_engines.py --model random --hidden 2048 --layers 16 \
        --device cuda --dtype bfloat16 --max-gen-toks 64                      # ~1B, on a GPU

`--model zoo` is the demo zoo (373K parameters, answers of 4 tokens): every cost there is
per-request overhead. `--model random` is a randomly initialised Llama built in code with three
perturbed fine-tunes (no hub), scored on the zoo's tasks: its answers are noise, so generations run
to `--max-gen-toks` as long answers do; the scores mean nothing there, the timings do.

A script, not a test (pytest does not collect it). The zoo is built on first use (a few minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GEN = ["zoo_add_gen", "zoo_succ_gen", "zoo_rev_gen", "zoo_sort_gen"]
MC = ["zoo_add", "zoo_succ", "zoo_rev", "zoo_sort"]
TASK_SETS = {"generative": GEN, "multiple choice": MC}


def recipes(base: str, finetunes: list[str], count: int) -> list[Any]:
    """`count` TIES merges with seeded random weights and densities: a real merge each."""
    import random

    from merging import recipe_from_dict

    rng = random.Random(0)
    return [
        recipe_from_dict(
            {
                "method": "ties",
                "base": base,
                "models": [
                    {"path": p, "weight": rng.uniform(0.2, 1.0), "density": rng.uniform(0.3, 1.0)}
                    for p in finetunes
                ],
                "parameters": {"lambda": rng.uniform(0.6, 1.3)},
            }
        )
        for _ in range(count)
    ]


def random_llama(root: Path, hidden: int, layers: int, dtype: str) -> tuple[str, list[str]]:
    """A randomly initialised Llama (head_dim 64, MLP 3x hidden, 4 query heads per KV head) and
    three fine-tunes that perturb it, saved as HF folders with the zoo's tokenizer (so the zoo's
    tasks can be scored; the scores mean nothing, the timings do). hidden 2048 x 16 layers is
    ~1B parameters with a real vocabulary; here the vocabulary is the zoo's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evaluators.zoo.build import make_tokenizer

    tok = make_tokenizer()
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    folders = []
    for k in range(4):
        folder = root / ("base" if k == 0 else f"ft{k}")
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    return folders[0], folders[1:]


def run_engine(kind: str, base: str, finetunes: list[str], todo: list[Any], args: Any) -> dict:
    """Start the engine once, then per candidate: one swap, then both task sets scored on it (a
    worker scores all of a study's tasks after one swap)."""
    from evaluators import HarnessEvaluator, HarnessSection
    from evaluators.engines import EngineStart, start_engine
    from merging import ResidentMerger

    dtype = args.dtype
    merger = ResidentMerger(base, finetunes, device=args.device, dtype=dtype)
    merger.prepare(("ties",))
    options: dict[str, Any] = {"engine": kind}
    if kind == "vllm":
        options["vllm"] = {"max_model_len": 512} if args.model == "random" else {}
        if args.compiled:
            options["vllm"]["enforce_eager"] = False
        if args.block_size:
            options["vllm"]["block_size"] = args.block_size
    t0 = time.perf_counter()
    section = HarnessSection(tasks=MC, **options)
    engine = start_engine(EngineStart(base, args.device, dtype, threads=args.threads), section)
    out: dict[str, Any] = {"start_s": time.perf_counter() - t0, "swap_s": []}
    evaluators = {}
    for name, tasks in TASK_SETS.items():
        if name not in args.tasks:
            continue
        section = HarnessSection(
            tasks=tasks,
            include_path=str(Path(args.zoo) / "tasks"),
            builtin_tasks=False,
            batch_size=args.batch_size,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None,
            **options,
        )
        evaluators[name] = HarnessEvaluator(section, split="validation")
        out[name] = {"eval_s": [], "items": []}
    for recipe in todo:
        t0 = time.perf_counter()
        engine.load(merger.candidate(recipe))
        out["swap_s"].append(time.perf_counter() - t0)
        for name, evaluator in evaluators.items():
            t0 = time.perf_counter()
            result = evaluator.evaluate(engine, per_item=True)
            out[name]["eval_s"].append(time.perf_counter() - t0)
            out[name]["items"].append(result.per_item)
    close = getattr(engine, "close", None)
    if close:
        close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default=str(REPO / ".zoo" / "seed0"))
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="the hf engine's batch")
    parser.add_argument("--limit", type=int, default=None, help="items per task")
    parser.add_argument("--model", choices=("zoo", "random"), default="zoo")
    parser.add_argument("--hidden", type=int, default=512, help="random model: hidden size")
    parser.add_argument("--layers", type=int, default=8, help="random model: layers")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compiled", action="store_true", help="vLLM compiles its graphs")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="generation length")
    parser.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt")
    parser.add_argument("--block-size", type=int, default=None, help="vLLM's KV block (tokens)")
    parser.add_argument(
        "--tasks", default="generative,multiple choice", help="task sets, comma-separated"
    )
    args = parser.parse_args()
    args.tasks = [t.strip() for t in args.tasks.split(",")]

    import tempfile

    from evaluators.zoo import build_zoo

    zoo = build_zoo(args.zoo, seed=0, progress=True)
    if args.model == "random":
        root = Path(tempfile.mkdtemp(prefix="basin-bench-"))
        base, finetunes = random_llama(root, args.hidden, args.layers, args.dtype)
    else:
        base, finetunes = str(zoo.base), [str(p) for p in zoo.finetunes.values()]
    todo = recipes(base, finetunes, args.candidates)
    print(f"{len(todo)} candidates, {args.device}, base {base}")
    runs = {kind: run_engine(kind, base, finetunes, todo, args) for kind in ("hf", "vllm")}

    def mean(xs: list[float]) -> float:
        return statistics.mean(xs[1:] if len(xs) > 1 else xs)  # the first call warms caches

    print(f"\nengine start: hf {runs['hf']['start_s']:.1f} s, vllm {runs['vllm']['start_s']:.1f} s")
    print(f"{'tasks':<16} {'hf eval s':>10} {'vllm eval s':>12} {'ratio':>7} {'same items':>11}")
    candidate = {"hf": mean(runs["hf"]["swap_s"]), "vllm": mean(runs["vllm"]["swap_s"])}
    for name in args.tasks:
        hf, vl = runs["hf"][name], runs["vllm"][name]
        ratio = mean(vl["eval_s"]) / mean(hf["eval_s"])
        same = sum(a == b for a, b in zip(hf["items"], vl["items"]))
        print(
            f"{name:<16} {mean(hf['eval_s']):>10.3f} {mean(vl['eval_s']):>12.3f} {ratio:>6.2f}x "
            f"{same:>7}/{len(todo)}"
        )
        for kind in candidate:
            candidate[kind] += mean(runs[kind][name]["eval_s"])
    swap = {kind: mean(runs[kind]["swap_s"]) for kind in candidate}
    print(
        f"swap per candidate (merge + load): hf {swap['hf']:.3f} s, vllm {swap['vllm']:.3f} s; "
        f"a vllm candidate (swap + {' + '.join(args.tasks)}) {candidate['vllm']:.2f} s, "
        f"the swap {swap['vllm'] / candidate['vllm']:.1%} of it, vLLM's own load (vllm swap - "
        f"hf swap) {(swap['vllm'] - swap['hf']) / candidate['vllm']:.1%}"
    )
    print(
        f"(means over the candidates after the first; ratio: vllm / hf; {args.num_fewshot}-shot; "
        f"vLLM block size {args.block_size or 'its default'})"
    )


if __name__ == "__main__":
    main()
