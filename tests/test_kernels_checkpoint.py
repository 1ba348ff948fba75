"""Span loading reads only the span's tensors; the tiny checkpoint writer's output."""

from __future__ import annotations

import json

import pytest
import torch

import kernels.checkpoint
from kernels import (
    CheckpointError,
    generate,
    load_blocks,
    load_client_pieces,
    load_local_model,
    read_weight_map,
    write_tiny_checkpoint,
)


class _SpyOpen:
    """Wraps safetensors.safe_open and records every file opened and tensor read."""

    def __init__(self, real):
        self.real, self.files, self.tensors = real, [], []

    def __call__(self, path, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.inner = spy.real(path, *args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                spy.tensors.append(name)
                return self.inner.get_tensor(name)

        self.files.append(str(path).rsplit("/", 1)[-1])
        return Handle()


@pytest.mark.parametrize("num_shards", [1, 5])
def test_loading_a_span_reads_only_its_tensors(tmp_path, monkeypatch, num_shards):
    write_tiny_checkpoint(tmp_path, num_layers=8, num_shards=num_shards)
    spy = _SpyOpen(kernels.checkpoint.safe_open)
    monkeypatch.setattr(kernels.checkpoint, "safe_open", spy)
    span = load_blocks(tmp_path, 2, 4)
    assert (span.start, span.end, len(span.blocks)) == (2, 4, 2)
    assert spy.tensors and all(
        name.startswith(("model.layers.2.", "model.layers.3.")) for name in spy.tensors
    )
    assert len(spy.tensors) == 2 * 9  # 4 attention + 3 mlp + 2 norm weights per llama block
    if num_shards > 1:
        weight_map = read_weight_map(tmp_path)
        assert set(spy.files) == {weight_map[name] for name in spy.tensors}


def test_span_loads_with_the_other_shards_deleted(tmp_path):
    write_tiny_checkpoint(tmp_path, num_layers=8, num_shards=8)
    expected = load_blocks(tmp_path, 5, 7)
    weight_map = read_weight_map(tmp_path)
    needed = {
        file for name, file in weight_map.items() if name.startswith(("model.layers.5.", "model.layers.6."))
    }
    for file in set(weight_map.values()) - needed:
        (tmp_path / file).unlink()
    span = load_blocks(tmp_path, 5, 7)
    for got, want in zip(span.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(Exception):  # noqa: B017 - the deleted shard surfaces as the OS error
        load_blocks(tmp_path, 0, 1)


def test_client_pieces_honour_tied_embeddings(tmp_path, monkeypatch):
    write_tiny_checkpoint(tmp_path, num_layers=2, tie_word_embeddings=True)
    spy = _SpyOpen(kernels.checkpoint.safe_open)
    monkeypatch.setattr(kernels.checkpoint, "safe_open", spy)
    client = load_client_pieces(tmp_path)
    assert sorted(spy.tensors) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert client.lm_head.weight is client.embed_tokens.weight


def test_untied_checkpoint_without_lm_head_fails_clearly(tmp_path):
    write_tiny_checkpoint(tmp_path, num_layers=1, tie_word_embeddings=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    load_client_pieces(tmp_path)  # tied: lm_head is simply not read
    with pytest.raises(ValueError, match="outside"):
        load_blocks(tmp_path, 0, 2)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        load_blocks(tmp_path, 0, 1)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_tiny_checkpoint_is_a_valid_hugging_face_checkpoint(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    config = write_tiny_checkpoint(tmp_path, model_type, num_layers=2, num_shards=2)
    assert (tmp_path / "model.safetensors.index.json").exists()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_local_model(tmp_path)
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens).logits, atol=1e-4, rtol=1e-4)


def test_tiny_tokenizer_round_trips_python_source(tmp_path):
    from tokenizers import Tokenizer

    config = write_tiny_checkpoint(tmp_path, num_layers=1)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "def square(x):\n    return x * x  # ünïcode\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < config.vocab_size
    assert len(ids) < len(text.encode())  # BPE merges learned something


def test_sampled_generation_is_reproducible_with_a_seed(tmp_path):
    write_tiny_checkpoint(tmp_path, num_layers=2)
    model = load_local_model(tmp_path)
    prompt = torch.tensor([[5, 6, 7]])
    runs = [
        generate(
            model,
            prompt,
            12,
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 15)
    greedy = generate(model, prompt, 12)
    eos = int(greedy[0, 5])
    stopped = generate(model, prompt, 12, eos_token_id=eos)
    assert int(stopped[0, -1]) == eos and stopped.shape[1] <= 6
    assert torch.equal(stopped, greedy[:, : stopped.shape[1]])
