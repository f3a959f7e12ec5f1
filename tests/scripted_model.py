"""A Llama whose next-token distribution is a hand-written bigram table: behaviour by construction.

A briefly trained tiny model writes different text on different CPUs (AVX2 and AVX-512 kernels
round differently, and a short training run amplifies that), so tests that need "a row that
ends at EOS", "a row that max_new_tokens cuts" or "a completion that writes a newline" cannot
rely on one. This model needs no training: the embedding of token v is a one-hot vector, every
attention and MLP block writes zeros into the residual stream (o_proj, down_proj = 0), and
lm_head maps the one-hot of v to the logits row of v in the table. So greedy decoding follows
`successors` exactly, with a logit margin no kernel rounding can flip, and sampling draws among
the successor and a few `alternatives`. It is a normal `LlamaForCausalLM` (head_dim 32), so HF
`generate`, peft and vLLM treat it like any checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

MARGIN = 2.0  # logit of the greedy successor over the alternatives: probability 0.65 at temperature 1
FLOOR = -20.0  # logit of every other token: never sampled in practice
HEAD_DIM = 32  # vLLM's CPU backend needs head_dim >= 32


def token_id(tokenizer: PreTrainedTokenizerBase, piece: str) -> int:
    """The id of `piece`, which must encode to exactly one token (the EOS token by its name)."""
    if piece == tokenizer.eos_token:
        return tokenizer.eos_token_id
    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{piece!r} is {len(ids)} tokens, want one"
    return ids[0]


def logits_table(tokenizer: PreTrainedTokenizerBase, successors: Mapping[str, str],
                 alternatives: Sequence[str]) -> torch.Tensor:
    """Row v holds the next-token logits after token v; tokens without a successor end the text."""
    size = len(tokenizer)
    table = torch.full((size, size), FLOOR)
    alt = [token_id(tokenizer, a) for a in alternatives]
    table[:, alt] = 0.0
    nxt = torch.full((size,), tokenizer.eos_token_id)
    for current, following in successors.items():
        nxt[token_id(tokenizer, current)] = token_id(tokenizer, following)
    table[torch.arange(size), nxt] = MARGIN
    return table


def bigram_llama(tokenizer: PreTrainedTokenizerBase, successors: Mapping[str, str], alternatives: Sequence[str],
                 max_position_embeddings: int = 96) -> LlamaForCausalLM:
    """A 2-layer Llama that decodes greedily along `successors` (see the module docstring)."""
    vocab = len(tokenizer)
    hidden = -(-vocab // HEAD_DIM) * HEAD_DIM  # one-hot embeddings need hidden >= vocab
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=2, head_dim=HEAD_DIM,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the blocks' other weights are random but never reach the output
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # The final RMSNorm turns the one-hot e_v into scale * e_v; undo that scale in lm_head.
        scale = 1.0 / (1.0 / hidden + config.rms_norm_eps) ** 0.5
        lm_head = torch.zeros(vocab, hidden)
        lm_head[:, :vocab] = logits_table(tokenizer, successors, alternatives).T / scale
        model.lm_head.weight.copy_(lm_head)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def greedy_script(tokenizer: PreTrainedTokenizerBase, successors: Mapping[str, str], prompt: str,
                  max_new_tokens: int) -> tuple[str, bool]:
    """What greedy decoding of `bigram_llama` writes after `prompt`, and whether EOS ended it.

    Walks the table in plain Python: the oracle the sampler's output is checked against.
    """
    last = tokenizer.decode(tokenizer(prompt, add_special_tokens=True)["input_ids"][-1:])
    pieces: list[str] = []
    for _ in range(max_new_tokens):
        last = successors.get(last, tokenizer.eos_token)
        if last == tokenizer.eos_token:
            return "".join(pieces), True
        pieces.append(last)
    return "".join(pieces), False
