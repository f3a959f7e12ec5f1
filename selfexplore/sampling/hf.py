"""The transformers `generate` backend: the CPU default, and the reference vLLM is checked against.

Speed: many sequences per `generate` call (KV cache on), rows sorted by prompt length so left
padding stays small, generation in segments that drop finished rows (and their KV cache) so
sequences that hit EOS or a stop string stop costing compute, and greedy decoding run once
per prompt.

Reproducibility: every sampled row draws from its own counter-based random stream keyed by
(seed, prompt index, sample index, step). A call's output therefore depends only on its
arguments, not on batch size, segmenting, which other rows stopped, or anything that ran
before; the global RNG is never touched. (Padding can still move logits by float rounding.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from selfexplore.completion import Completion
from selfexplore.sampling.base import (
    DrawParams,
    OverlongMode,
    SamplerBase,
    Seeds,
    check_backend_args,
    check_draws,
    check_seeds,
    derive_seed,
    plan_prompt,
    prompt_seed,
    stop_token_ids,
    truncate_at_stop,
)

_MASK64 = (1 << 64) - 1


def _uniform(row_seed: int, step: int) -> float:
    """A uniform in [0, 1) from (row seed, step): splitmix64 of a Weyl counter, 24 bits (exact in fp32)."""
    z = (row_seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 40) / (1 << 24)


class _RowSeededSampler(LogitsProcessor):
    """Samples each row's next token by inverse CDF with that row's own uniform.

    It runs last in greedy mode and leaves only the drawn token finite, so `generate`'s argmax
    picks it: exact sampling from the (temperature-scaled, top-p-filtered) distribution
    without the shared RNG, so no row's draws depend on the others.
    """

    def __init__(self, row_seeds: list[int], prompt_width: int) -> None:
        self.row_seeds = row_seeds
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        u = torch.tensor([_uniform(s, step) for s in self.row_seeds], dtype=cdf.dtype, device=cdf.device)
        # Scaling by the total keeps the draw inside the support despite rounding in the cumsum.
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=scores.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class _FinishRecorder(StoppingCriteria):
    """Stops a row on EOS or a stop string and records how many tokens it generated.

    `generate` pads finished rows; recording the finishing step is what lets us count real
    tokens even when the pad id equals the EOS id.
    """

    def __init__(self, prompt_width: int, batch: int, eos_ids: torch.Tensor,
                 stop_criteria: StopStringCriteria | None) -> None:
        self.prompt_width = prompt_width
        self.eos_ids = eos_ids
        self.stop_criteria = stop_criteria
        # Kept on the model's device: no host sync per decoding step.
        self.lengths = torch.full((batch,), -1, dtype=torch.long, device=eos_ids.device)
        self.by_eos = torch.zeros(batch, dtype=torch.bool, device=eos_ids.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        eos = torch.isin(input_ids[:, -1], self.eos_ids)
        done = (eos | self.stop_criteria(input_ids, scores)) if self.stop_criteria is not None else eos
        new = done & (self.lengths < 0)
        self.lengths = torch.where(new, input_ids.shape[1] - self.prompt_width, self.lengths)
        self.by_eos = self.by_eos | (new & eos)
        return done


class HFSampler(SamplerBase):
    """`Sampler` over a loaded causal LM (a live policy between rounds, or a checkpoint).

    `batch_size` is the number of sequences per `generate` call; `segment_tokens` how many
    tokens are generated between two prunings of finished rows.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64,
                 overlong_prompts: OverlongMode = "skip", max_model_len: int | None = None,
                 segment_tokens: int = 16) -> None:
        check_backend_args(batch_size, overlong_prompts)
        if segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.segment_tokens = segment_tokens
        self.overlong_prompts: OverlongMode = overlong_prompts
        self.context = max_model_len or getattr(model.config, "max_position_embeddings", None)
        self.generated_tokens = 0
        self.overlong_count = 0
        self.eos_ids = torch.tensor(stop_token_ids(model.generation_config.eos_token_id, tokenizer), dtype=torch.long)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_ids[0]) if pad is None else pad
        self._stop_cache: dict[tuple[str, ...], StopStringCriteria] = {}

    @classmethod
    def from_pretrained(cls, model_path: str | Path, adapter_path: str | Path | None = None, *,
                        batch_size: int = 64, overlong_prompts: OverlongMode = "skip",
                        max_model_len: int | None = None, dtype: str = "auto", local_rank: int = 0) -> HFSampler:
        """Load a model folder (+ LoRA adapter, merged for speed) on the rank's GPU if any, else CPU."""
        from selfexplore.models import ModelSpec, load_model, load_tokenizer

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        spec = ModelSpec(path=str(model_path), dtype=dtype,
                         adapter_path=None if adapter_path is None else str(adapter_path))
        model = load_model(spec, for_training=False)
        if adapter_path is not None:
            model = model.merge_and_unload()
        return cls(model.to(device).eval(), load_tokenizer(str(model_path)), batch_size=batch_size,
                   overlong_prompts=overlong_prompts, max_model_len=max_model_len)

    def generate(self, prompts: Sequence[str], n: int, draws: DrawParams, seed: Seeds) -> list[list[Completion]]:
        check_draws(n, draws)
        check_seeds(seed, len(prompts))
        encoded = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        kept: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            keep = plan_prompt(len(ids), draws.max_new_tokens, self.context, self.overlong_prompts, i)
            self.overlong_count += keep != len(ids)
            if keep is not None:
                kept[i] = ids[len(ids) - keep:]

        def row_seed(i: int, k: int) -> int:
            base, index = prompt_seed(seed, i)
            return derive_seed(base, "row", index, k)

        greedy = draws.temperature == 0
        # One row (prompt index, sample index) per sequence; longest prompts first so padding
        # stays small and an out-of-memory error shows at once.
        rows = sorted(((i, k) for i in kept for k in range(1 if greedy else n)), key=lambda r: -len(kept[r[0]]))
        results: list[list[Completion]] = [[] for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            texts = self._generate_batch([kept[i] for i, _ in batch], [row_seed(i, k) for i, k in batch], draws)
            for (i, _), text in zip(batch, texts):
                results[i].append(text)
        return [r * n for r in results] if greedy else results

    def _generate_batch(self, prompt_ids: list[list[int]], row_seeds: list[int], draws: DrawParams) -> list[Completion]:
        """Generate one row per prompt (left-padded) and return the decoded, stop-truncated texts."""
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for r, ids in enumerate(prompt_ids):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        try:
            with torch.inference_mode():
                new_ids, by_eos, finished = self._decode_segments(input_ids.to(device), attention.to(device),
                                                                  row_seeds, draws)
        finally:
            self.model.train(was_training)
        self.generated_tokens += sum(len(ids) for ids in new_ids)
        texts = [truncate_at_stop(self._continuation(prompt, ids[:len(ids) - eos]), draws.stop)
                 for prompt, ids, eos in zip(prompt_ids, new_ids, by_eos)]
        return [Completion(text, done, len(ids)) for text, ids, done in zip(texts, new_ids, finished)]

    def _decode_segments(self, input_ids: torch.Tensor, attention: torch.Tensor, row_seeds: list[int],
                         draws: DrawParams) -> tuple[list[list[int]], list[bool], list[bool]]:
        """Generate in segments of `segment_tokens`, dropping finished rows (and their KV cache) in between.

        `generate` keeps computing rows that hit EOS until the whole batch is done; sampled
        lengths vary a lot, so pruning every segment saves much of the batch's compute.
        Returns per row the generated ids (with the EOS/stop-completing token), whether EOS ended
        it, and whether it ended at all (False: `max_new_tokens` cut it).
        """
        batch, prompt_width = input_ids.shape
        new_ids: list[list[int]] = [[] for _ in range(batch)]
        by_eos = [False] * batch
        rows = list(range(batch))  # original index of each row still generating
        eos_ids = self.eos_ids.to(input_ids.device)
        stop_criteria = self._stop_criteria(draws.stop)
        config = GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids.tolist())
        cache = DynamicCache(config=self.model.config)  # ours, so finished rows can be pruned from it
        produced = 0
        while rows and produced < draws.max_new_tokens:
            config.max_new_tokens = min(self.segment_tokens, draws.max_new_tokens - produced)
            processors = LogitsProcessorList()
            if draws.temperature > 0:
                processors.append(TemperatureLogitsWarper(draws.temperature))
                if draws.top_p < 1.0:
                    processors.append(TopPLogitsWarper(draws.top_p))
                processors.append(_RowSeededSampler([row_seeds[r] for r in rows], prompt_width))
            recorder = _FinishRecorder(input_ids.shape[1], len(rows), eos_ids, stop_criteria)
            sequences = self.model.generate(input_ids=input_ids, attention_mask=attention, past_key_values=cache,
                                            generation_config=config, logits_processor=processors,
                                            stopping_criteria=StoppingCriteriaList([recorder]))
            segment = sequences[:, input_ids.shape[1]:]
            produced += segment.shape[1]
            lengths = torch.where(recorder.lengths < 0, segment.shape[1], recorder.lengths).tolist()
            ended_by_eos = recorder.by_eos.tolist()
            for r, row in enumerate(rows):
                new_ids[row].extend(segment[r, :lengths[r]].tolist())
                by_eos[row] = ended_by_eos[r]
            keep = (recorder.lengths < 0).nonzero().squeeze(1)
            if len(keep) < len(rows):
                cache.batch_select_indices(keep)
            rows = [rows[i] for i in keep.tolist()]
            attention = torch.cat([attention, attention.new_ones(segment.shape)], dim=1)[keep]
            input_ids = sequences[keep]
        cut = set(rows)
        return new_ids, by_eos, [row not in cut for row in range(batch)]

    def _continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """Decode new tokens in the context of the prompt.

        Decoding them alone can drop or add a leading space (SentencePiece); decoding
        prompt+completion and removing the decoded prompt gives what a reader of the whole
        text sees, which is what vLLM's incremental detokenizer returns too.
        """
        decode = self.tokenizer.decode
        prefix = decode(prompt_ids, skip_special_tokens=True)
        full = decode(prompt_ids + new_ids, skip_special_tokens=True)
        if full.startswith(prefix):
            return full[len(prefix):]
        return decode(new_ids, skip_special_tokens=True)

    def _stop_criteria(self, stop: tuple[str, ...]) -> StopStringCriteria | None:
        """Stop-string criteria (costly to build for big vocabularies, so cached per stop list)."""
        if not stop:
            return None
        if stop not in self._stop_cache:
            self._stop_cache[stop] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
        return self._stop_cache[stop]
