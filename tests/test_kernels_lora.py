"""LoRA and soft prompts in kernels: the hook adds exactly PEFT's ``scaling * B A x`` only inside
``lora_applied`` (a concurrent forward outside it is untouched), QLoRA-style through quantized
linears, the PEFT layouts round-trip, adapters from the network are validated; the servers'
adapter cache is bounded and expires (injected clock)."""  # row groups, deep prompts, checkpointing: test_kernels_span_training.py

from __future__ import annotations

import threading

import pytest
import torch

from kernels import load_config, load_local_model, quantize_linears_
from kernels.lora import (
    LoraAdapters,
    LoraConfig,
    adapter_hash,
    check_span_tensors,
    load_peft,
    local_forward,
    lora_applied,
    save_peft,
)
from kernels.prompt_tuning import SoftPrompt, load_prompt_peft, save_prompt_peft
from kernels.tiny import write_tiny_checkpoint
from swarm.serving.adapter_cache import AdapterCache, ServedAdapter

IDS = torch.tensor([[1, 17, 42, 99, 7, 300]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "model"
    write_tiny_checkpoint(path, num_layers=2, hidden_size=64)
    return path


def _frozen(checkpoint):
    model = load_local_model(checkpoint)
    model.requires_grad_(False)
    return model


def test_hook_adds_scaled_low_rank_term_only_inside_the_context(checkpoint):
    model = _frozen(checkpoint)
    adapters = LoraAdapters(model.config, LoraConfig(rank=4, alpha=8, targets=("q",)), init_b_std=0.1)
    tensors = adapters.span_tensors(0, 2)
    q_proj = model.span.blocks[1].self_attn.q_proj
    x = torch.randn(1, 3, 64)
    plain = q_proj(x)
    with lora_applied(model.span, tensors, 2.0):
        adapted = q_proj(x)
        outside = []  # another thread (another context) sees the plain linear
        thread = threading.Thread(target=lambda: outside.append(q_proj(x)))
        thread.start()
        thread.join()
    expected = plain + 2.0 * (x @ tensors["q.A"][1].T) @ tensors["q.B"][1].T
    torch.testing.assert_close(adapted, expected)
    torch.testing.assert_close(outside[0], plain, rtol=0, atol=0)
    torch.testing.assert_close(q_proj(x), plain, rtol=0, atol=0)


def test_qlora_gradients_flow_through_dequantized_weights(checkpoint):
    model = _frozen(checkpoint)
    quantize_linears_(model.span, kind="nf4")
    adapters = LoraAdapters(model.config, LoraConfig(rank=2, targets=("v", "up")), init_b_std=0.1)
    local_forward(model, IDS, adapters).sum().backward()
    for name, parameter in adapters.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    layer = model.span.blocks[0].mlp.up_proj
    x = torch.randn(2, 64)
    tensors = adapters.span_tensors(0, 2)
    with lora_applied(model.span, tensors, adapters.lora.scaling):
        adapted = layer(x)
    weight = layer.dequantize_weight(torch.float32)
    expected = x @ weight.T + adapters.lora.scaling * (x @ tensors["up.A"][0].T) @ tensors["up.B"][0].T
    torch.testing.assert_close(adapted, expected)


def test_peft_layouts_round_trip(checkpoint, tmp_path):
    config = load_config(checkpoint)
    adapters = LoraAdapters(
        config, LoraConfig(rank=3, alpha=6, targets=("k", "o", "gate")), seed=5, init_b_std=1
    )
    save_peft(adapters, tmp_path / "lora")
    loaded = load_peft(config, tmp_path / "lora")
    assert loaded.lora == adapters.lora
    for name, value in adapters.tensors.items():
        torch.testing.assert_close(loaded.tensors[name], value, rtol=0, atol=0)
    prompt = SoftPrompt(config, 5, seed=3)
    save_prompt_peft(prompt, tmp_path / "prompt")
    torch.testing.assert_close(load_prompt_peft(config, tmp_path / "prompt").prompt_embeddings,
                               prompt.prompt_embeddings, rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match="not LORA"):
        load_peft(config, tmp_path / "prompt")
    with pytest.raises(ValueError, match="not PROMPT_TUNING"):
        load_prompt_peft(config, tmp_path / "lora")


def test_soft_prompt_matches_peft_prompt_tuning(checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _frozen(checkpoint)
    prompt = SoftPrompt(model.config, 4, seed=1, std=0.5)
    save_prompt_peft(prompt, tmp_path / "prompt")
    base = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, tmp_path / "prompt")(input_ids=IDS).logits
        ours = local_forward(model, IDS, prompt=prompt)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_adapters_from_the_network_are_validated(checkpoint):
    config = load_config(checkpoint)
    tensors = {
        k: v.detach()
        for k, v in LoraAdapters(config, LoraConfig(rank=2, targets=("q",))).span_tensors(0, 2).items()
    }
    assert check_span_tensors(config, tensors, 2) == (2, ("q",))
    with pytest.raises(ValueError, match="must have shape"):
        check_span_tensors(config, tensors, 1)
    with pytest.raises(ValueError, match="targets in"):
        check_span_tensors(config, {"x.A": tensors["q.A"], "x.B": tensors["q.B"]}, 2)
    with pytest.raises(ValueError, match="finite"):
        check_span_tensors(config, {**tensors, "q.B": torch.full_like(tensors["q.B"], float("inf"))}, 2)
    assert adapter_hash(tensors, 2.0) == adapter_hash(dict(reversed(tensors.items())), 2.0)
    assert adapter_hash(tensors, 2.0) != adapter_hash(tensors, 1.0)
    assert adapter_hash(tensors, 2.0) != adapter_hash({**tensors, "q.A": tensors["q.A"] + 1e-6}, 2.0)


def test_adapter_cache_is_bounded_and_expires():
    now = [0.0]
    cache = AdapterCache(max_entries=2, ttl=10.0, clock=lambda: now[0])
    one = {"q.A": torch.zeros(1)}
    cache.put(ServedAdapter(b"a", one, 1.0))
    cache.put(ServedAdapter(b"b", one, 1.0))
    now[0] = 5.0
    assert cache.get(b"a") is not None  # used: now the most recent
    cache.put(ServedAdapter(b"c", one, 1.0))  # evicts b, the least recently used
    assert cache.get(b"b") is None and len(cache) == 2
    now[0] = 14.0
    assert cache.get(b"a") is not None and cache.get(b"c") is not None
    now[0] = 30.0
    assert cache.get(b"a") is None and len(cache) == 0
