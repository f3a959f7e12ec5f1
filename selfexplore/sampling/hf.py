"""The transformers `generate` backend: the CPU default, and the reference vLLM is checked against.

Speed comes from batching many sequences per `generate` call (KV cache on), sorting rows by
prompt length so left padding stays small, and running greedy decoding once per prompt.
Reproducibility: each batch is seeded from (seed, batch index) inside a forked RNG, so a call's
output depends only on its arguments and `batch_size`, never on what ran before, and the
caller's global RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from selfexplore.sampling.base import (
    OverlongMode,
    check_backend_args,
    check_sampling_args,
    derive_seed,
    plan_prompt,
    truncate_at_stop,
)


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


class HFSampler:
    """`Sampler` over a loaded causal LM (a live policy between rounds, or a checkpoint)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64,
                 overlong_prompts: OverlongMode = "skip", max_model_len: int | None = None) -> None:
        check_backend_args(batch_size, overlong_prompts)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.overlong_prompts: OverlongMode = overlong_prompts
        self.context = max_model_len or getattr(model.config, "max_position_embeddings", None)
        self.generated_tokens = 0
        self.overlong_count = 0
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        if eos is None:
            raise ValueError("the model has no EOS token id (generation_config or tokenizer): cannot stop")
        self.eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], dtype=torch.long)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_ids[0]) if pad is None else pad
        self._stop_cache: dict[tuple[str, ...], StopStringCriteria] = {}

    @classmethod
    def from_pretrained(cls, model_path: str | Path, adapter_path: str | Path | None = None, *,
                        batch_size: int = 64, overlong_prompts: OverlongMode = "skip",
                        max_model_len: int | None = None, dtype: str = "auto") -> HFSampler:
        """Load a model folder (+ LoRA adapter, merged for speed) on GPU if available, else CPU."""
        from selfexplore.models import ModelSpec, load_model, load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        spec = ModelSpec(path=str(model_path), dtype=dtype,
                         adapter_path=None if adapter_path is None else str(adapter_path))
        model = load_model(spec, for_training=False)
        if adapter_path is not None:
            model = model.merge_and_unload()
        return cls(model.to(device).eval(), load_tokenizer(str(model_path)), batch_size=batch_size,
                   overlong_prompts=overlong_prompts, max_model_len=max_model_len)

    def generate(self, prompts: Sequence[str], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop: Sequence[str] | None, seed: int) -> list[list[str]]:
        check_sampling_args(n, temperature, top_p, max_new_tokens)
        stop = [s for s in (stop or []) if s]
        encoded = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        kept: list[list[int] | None] = []
        for i, ids in enumerate(encoded):
            keep = plan_prompt(len(ids), max_new_tokens, self.context, self.overlong_prompts, i)
            self.overlong_count += keep != len(ids)
            kept.append(None if keep is None else ids[len(ids) - keep:])

        greedy = temperature == 0
        copies = 1 if greedy else n
        # One row per sequence; longest prompts first so padding is small and OOM shows early.
        rows = sorted(((i, c) for i, ids in enumerate(kept) if ids is not None for c in range(copies)),
                      key=lambda r: -len(kept[r[0]]))  # type: ignore[arg-type]
        results: list[list[str]] = [[] for _ in prompts]
        for b, start in enumerate(range(0, len(rows), self.batch_size)):
            batch = rows[start:start + self.batch_size]
            texts = self._generate_batch([kept[i] for i, _ in batch], temperature, top_p,  # type: ignore[misc]
                                         max_new_tokens, stop, derive_seed(seed, "batch", b))
            for (i, _), text in zip(batch, texts):
                results[i].append(text)
        if greedy:
            results = [r * n for r in results]
        return results

    def _generate_batch(self, prompt_ids: list[list[int]], temperature: float, top_p: float,
                        max_new_tokens: int, stop: list[str], seed: int) -> list[str]:
        """Generate one row per prompt (left-padded) and return the decoded, stop-truncated texts."""
        device = self.model.device
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for r, ids in enumerate(prompt_ids):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        recorder = _FinishRecorder(width, len(prompt_ids), self.eos_ids.to(device), self._stop_criteria(stop))
        greedy = temperature == 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
            temperature=None if greedy else temperature, top_p=None if greedy else top_p,
            top_k=None if greedy else 0, repetition_penalty=1.0,
            pad_token_id=self.pad_id, eos_token_id=self.eos_ids.tolist(),
        )
        was_training = self.model.training
        self.model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                          generation_config=config,
                                          stopping_criteria=StoppingCriteriaList([recorder]))
        finally:
            self.model.train(was_training)
        generated = out[:, width:].cpu()
        lengths = torch.where(recorder.lengths < 0, generated.shape[1], recorder.lengths).cpu()
        by_eos = recorder.by_eos.cpu()
        self.generated_tokens += int(lengths.sum())
        texts = []
        for r, ids in enumerate(prompt_ids):
            new = generated[r, :int(lengths[r]) - int(by_eos[r])].tolist()
            texts.append(truncate_at_stop(self._continuation(ids, new), stop))
        return texts

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

    def _stop_criteria(self, stop: list[str]) -> StopStringCriteria | None:
        """Stop-string criteria (costly to build for big vocabularies, so cached per stop list)."""
        if not stop:
            return None
        key = tuple(stop)
        if key not in self._stop_cache:
            self._stop_cache[key] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
        return self._stop_cache[key]
