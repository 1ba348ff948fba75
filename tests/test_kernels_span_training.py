"""A span's training forward: row groups with their own LoRA adapters give each row what it gets
alone; deep prompts with zero per-block vectors are a soft prompt, and their gradients match a
hand-written loop; activation checkpointing gives the same gradients while autograd keeps fewer
bytes; the servers' training batcher runs concurrent requests as one batch with the results and
gradients each would get alone, and sessions of different adapters share a step."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import load_local_model
from kernels.deep_prompts import DeepPrompt, add_block_prompt
from kernels.lora import LoraAdapters, LoraConfig, RowAdapters, local_forward, lora_applied
from kernels.prompt_tuning import SoftPrompt
from kernels.span_training import run_span_blocks
from kernels.tiny import write_tiny_checkpoint
from swarm.serving.adapter_cache import ServedAdapter
from swarm.serving.training_batches import TrainingBatcher, TrainingJob, run_group

IDS = torch.tensor([[1, 17, 42, 99, 7, 300], [3, 9, 27, 81, 243, 11], [5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("span-training") / "model"
    write_tiny_checkpoint(path, num_layers=3, hidden_size=64)
    model = load_local_model(path)
    model.requires_grad_(False)
    return model


def _lora(model, seed: int, targets=("q", "v", "down")) -> dict[str, torch.Tensor]:
    adapters = LoraAdapters(model.config, LoraConfig(rank=2, targets=targets), seed=seed, init_b_std=0.1)
    return {name: t.detach() for name, t in adapters.span_tensors(0, 3).items()}


def test_row_groups_use_their_own_adapters(model):
    hidden = model.client.embed(IDS)
    first, second = _lora(model, 1), _lora(model, 2, targets=("k", "up"))
    with torch.no_grad():
        grouped = run_span_blocks(
            model.span,
            hidden,
            [RowAdapters(1, first, 2.0), RowAdapters(1, None), RowAdapters(1, second, 0.5)],
        )
        with lora_applied(model.span, first, 2.0):
            alone_first = model.span(hidden[:1])
        plain = model.span(hidden[1:2])
        with lora_applied(model.span, second, 0.5):
            alone_second = model.span(hidden[2:])
    torch.testing.assert_close(grouped, torch.cat([alone_first, plain, alone_second]), rtol=0, atol=1e-6)


def test_deep_prompts_with_zero_block_vectors_are_a_soft_prompt_and_differentiate_as_a_loop(model):
    deep = DeepPrompt(model.config, 2, seed=3, std=0.5)
    soft = SoftPrompt(model.config, 2)
    with torch.no_grad():
        soft.prompt_embeddings.copy_(deep.prompt_embeddings)
        deep.intermediate.zero_()
    torch.testing.assert_close(local_forward(model, IDS, prompt=deep), local_forward(model, IDS, prompt=soft))
    with torch.no_grad():
        deep.intermediate.normal_(std=0.5)
    local_forward(model, IDS, prompt=deep).square().mean().backward()
    expected_grad = deep.intermediate.grad.clone()
    deep.zero_grad()
    hidden = deep.prepend(model.client.embed(IDS))
    for index, block in enumerate(model.span.blocks):  # Petals' server loop, by hand
        hidden = block(add_block_prompt(hidden, deep.intermediate[index]))
    model.client.logits(hidden).square().mean().backward()
    assert expected_grad.abs().sum() > 0
    torch.testing.assert_close(deep.intermediate.grad, expected_grad, rtol=0, atol=1e-6)


def _saved_bytes_and_grads(model, checkpoint: bool):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    leaf = model.client.embed(IDS).detach().requires_grad_(True)
    lora = {n: t.clone().requires_grad_(True) for n, t in _lora(model, 4).items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run_span_blocks(model.span, leaf, [RowAdapters(3, lora, 2.0)], checkpoint=checkpoint)
    grads = torch.autograd.grad(output.square().sum(), [leaf, *lora.values()])
    return sum(saved), grads


def test_checkpointing_keeps_fewer_bytes_for_the_same_gradients(model):
    plain_bytes, plain = _saved_bytes_and_grads(model, checkpoint=False)
    checkpointed_bytes, checkpointed = _saved_bytes_and_grads(model, checkpoint=True)
    assert checkpointed_bytes * 3 < plain_bytes, (checkpointed_bytes, plain_bytes)
    for ours, theirs in zip(checkpointed, plain, strict=True):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def _jobs(model, kind: str) -> list[TrainingJob]:
    hidden = model.client.embed(IDS).detach()
    prompts = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(7)) * 0.3
    adapters = [
        ServedAdapter(b"1", _lora(model, 1), 2.0),
        None,
        ServedAdapter(b"2", _lora(model, 2, ("o",)), 1.0),
    ]
    grad = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(8))
    return [
        TrainingJob(kind, 0, 3, hidden[i : i + 1], adapters[i], prompts * (i + 1), grad[i : i + 1] if kind == "backward" else None)
        for i in range(3)
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["forward", "backward", "keep"])
def test_concurrent_requests_batch_with_the_results_they_get_alone(model, kind):
    jobs = _jobs(model, kind)
    alone = [run_group(model.span, [job])[0] for job in jobs]
    batcher = TrainingBatcher(lambda start, end: model.span)

    async def concurrently():
        runner = asyncio.create_task(batcher.run())
        try:
            return await asyncio.gather(*(batcher.submit(job) for job in jobs))
        finally:
            runner.cancel()

    batched = asyncio.run(concurrently())
    assert batcher.groups == 1 and batcher.batched_jobs == 3
    grad = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(9))
    for ours, theirs in zip(batched, alone, strict=True):
        if kind == "keep":  # the kept graphs give each request its own gradients
            ours, theirs = ours.gradients(grad), theirs.gradients(grad)
        flat_ours, flat_theirs = _flatten(ours), _flatten(theirs)
        assert len(flat_ours) == len(flat_theirs) and any(t.abs().sum() > 0 for t in flat_theirs)
        for a, b in zip(flat_ours, flat_theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    grad_hidden, grad_adapters, grad_prompts = result
    return [grad_hidden, *(grad_adapters[name] for name in sorted(grad_adapters)), grad_prompts]


def test_session_steps_with_different_adapters_batch_with_the_outputs_they_get_alone(model):
    """The inference batcher: sessions opened with different LoRA adapters (or none) share a forward."""
    from swarm.serving.batching import StepBatcher

    adapters = [
        ServedAdapter(b"1", _lora(model, 1), 2.0),
        None,
        ServedAdapter(b"2", _lora(model, 2, ("up",)), 0.5),
    ]
    generator = torch.Generator().manual_seed(11)
    prefixes = [
        torch.randn(rows, length, 64, generator=generator) for rows, length in ((2, 4), (1, 6), (1, 3))
    ]
    steps = [torch.randn(p.shape[0], 1, 64, generator=generator) for p in prefixes]

    async def scenario(together: bool):
        batcher = StepBatcher(model.span, max_rows=64)
        runner = asyncio.create_task(batcher.run())
        caches = [model.span.allocate_cache(p.shape[0], 8) for p in prefixes]
        for cache, prefix, adapter in zip(caches, prefixes, adapters, strict=True):
            await batcher.step(cache, prefix, 0, adapter)
        calls = [
            batcher.step(c, s, p.shape[1], a)
            for c, s, p, a in zip(caches, steps, prefixes, adapters, strict=True)
        ]
        outputs = await asyncio.gather(*calls) if together else [await call for call in calls]
        runner.cancel()
        return outputs, batcher.batched_steps

    alone, batched_alone = asyncio.run(scenario(False))
    together, batched = asyncio.run(scenario(True))
    assert (batched_alone, batched) == (0, 3)
    for mine, theirs in zip(together, alone, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lora_applied(model.span, adapters[0].tensors, 2.0):  # the adapter is applied
        cache = model.span.allocate_cache(2, 8)
        model.span(prefixes[0], cache)
        torch.testing.assert_close(alone[0], model.span(steps[0], cache), rtol=1e-5, atol=1e-5)
