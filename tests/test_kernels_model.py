"""Our Llama-family model against transformers (the independent reference)."""

from __future__ import annotations

import pytest
import torch

from kernels import KVCache, generate, load_blocks, load_client_pieces, load_config, load_local_model
from kernels.model_config import ModelConfig, UnsupportedModelError

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             vocab_size=128, max_position_embeddings=256, initializer_range=0.1,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip

CASES = {
    "llama-gqa-llama3-tied": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-mha-bias": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "mistral-window-head-dim": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=16, head_dim=32, tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    """(directory, transformers model) for one tiny random config saved with save_pretrained."""
    config_class, extra = CASES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SMALL, **extra)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory, safe_serialization=True)
    return directory, reference


def test_full_forward_matches_transformers(checkpoint):
    directory, reference = checkpoint
    ours = load_local_model(directory)
    input_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = ours(input_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(checkpoint):
    directory, reference = checkpoint
    ours = load_local_model(directory)
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                  do_sample=False, pad_token_id=0)  # fmt: skip
    got = generate(ours, prompt, max_new_tokens=32)
    assert got.shape == (2, 38)
    assert torch.equal(got, expected)


def test_spans_step_by_step_equal_full_forward(checkpoint):
    directory, _ = checkpoint
    config = load_config(directory)
    client = load_client_pieces(directory)
    spans = [load_blocks(directory, a, b) for a, b in ((0, 1), (1, 3), (3, 4))]
    caches = [span.allocate_cache(batch_size=2, max_length=40) for span in spans]
    tokens = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    full = load_local_model(directory)
    with torch.no_grad():
        expected = full(tokens)
        pieces, start = [], 0
        for stop in (5, 6, 7, 12, *range(13, 31)):  # a prefill, then chunks and single steps
            hidden = client.embed(tokens[:, start:stop])
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, cache)
            pieces.append(client.logits(hidden))
            start = stop
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert caches[0].lengths.tolist() == [30, 30]


def test_rows_at_different_positions_batch_into_one_forward(checkpoint):
    directory, _ = checkpoint
    model = load_local_model(directory)
    first = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    second = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        caches = [model.allocate_cache(1, 32), model.allocate_cache(1, 32)]
        model(first, caches[0])
        model(second, caches[1])
        merged = KVCache(
            [torch.cat([a, b]) for a, b in zip(caches[0].keys, caches[1].keys, strict=True)],
            [torch.cat([a, b]) for a, b in zip(caches[0].values, caches[1].values, strict=True)],
            torch.cat([caches[0].lengths, caches[1].lengths]),
            model.config.sliding_window,
        )
        step = torch.tensor([[7], [11]])
        batched = model(step, merged)[:, -1]
        alone_first = model(torch.cat([first, step[:1]], dim=1))[:, -1]
        alone_second = model(torch.cat([second, step[1:]], dim=1))[:, -1]
    torch.testing.assert_close(batched, torch.cat([alone_first, alone_second]), atol=1e-5, rtol=1e-5)
    assert merged.lengths.tolist() == [10, 5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close(checkpoint, dtype):
    directory, _ = checkpoint
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = load_local_model(directory)(tokens)
        half = load_local_model(directory, dtype=dtype)
        got = half(tokens)
        cache = half.allocate_cache(1, 16)
        stepped = torch.cat(
            [half(tokens[:, :10], cache), *(half(tokens[:, i : i + 1], cache) for i in range(10, 16))], 1
        )
    assert half.span.blocks[0].mlp.up_proj.weight.dtype == dtype
    assert (got - expected).abs().max() < 0.05 * expected.abs().max() + 0.05
    assert (stepped - got).abs().max() < 0.05 * expected.abs().max() + 0.05


def test_cache_overflow_is_a_clear_error(tmp_path):
    from kernels import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, num_layers=1)
    model = load_local_model(tmp_path)
    cache = model.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_unsupported_model_type_and_options_name_themselves():
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 32}  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelConfig.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict(
            {**base, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
        )
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_dict({**base, "model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        ModelConfig.from_dict({**base, "model_type": "qwen2", "use_sliding_window": True})


def test_config_reads_old_and_new_rope_spellings():
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32}  # fmt: skip
    old_scaling = {key: value for key, value in LLAMA3_ROPE.items() if key != "rope_theta"}
    old = ModelConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": old_scaling})
    new = ModelConfig.from_dict({**base, "rope_parameters": LLAMA3_ROPE})
    assert old == new
    assert new.rope_type == "llama3" and new.rope_original_max_positions == 16 and new.head_dim == 16
    assert ModelConfig.from_dict(new.to_dict()) == new
