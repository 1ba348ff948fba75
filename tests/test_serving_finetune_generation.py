"""Generation with a fine-tuned adapter through real `swarm join` processes on 127.0.0.1: an
adapter trained through the swarm generates in KV-cached sessions (the servers apply it) the
tokens our local model and `transformers` + `peft` give with it, also with a soft prompt; a server
SIGKILLed mid-generation is replaced, the adapter uploaded to the replacement, and the tokens
stay the same; deep prompts (per-block prompts on the servers) get the gradients of local
autograd through 3 and 2 servers within 1e-5."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import load_config, load_local_model
from kernels.deep_prompts import DeepPrompt
from kernels.lora import LoraAdapters, LoraConfig, local_forward, save_peft
from kernels.prompt_tuning import SoftPrompt
from swarm.serving.remote_training import connect_in_thread
from tests.harness import NEW_TOKENS, PROMPT, client_config, three_server_swarm, wait_until_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 64], [3, 9, 27, 81, 243, 11, 12, 13]])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with three_server_swarm(tmp_path_factory.mktemp("finetune-generation")) as swarm:
        swarm.join("d", "2:3")  # a second holder of blocks 2:3, the replacement
        swarm.wait_online("d")
        yield swarm


def _client(swarm, *listing: str):
    client = connect_in_thread(swarm.checkpoint, swarm.peers, config=client_config())
    client.__enter__()
    try:
        wait_until_sync(lambda: client.run(client.model.list_servers()),
                        until=lambda servers: all(swarm.peer_ids[name] in servers for name in listing),
                        what=f"the client to list {listing}", timeout=30)  # fmt: skip
    except BaseException:
        client.__exit__(None, None, None)
        raise
    return client


def _loss(logits: torch.Tensor, virtual: int = 0) -> torch.Tensor:
    logits = logits[:, virtual:-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def _local_greedy(model, ids: torch.Tensor, adapters=None, prompt=None) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_id = local_forward(model, ids, adapters, prompt)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_trained_adapter_generates_in_sessions_as_locally_and_with_peft(swarm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(swarm.checkpoint)
    lora = LoraAdapters(
        config, LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down")), seed=3, init_b_std=0.3
    )
    prompt = SoftPrompt(config, 3, seed=4, std=0.5)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    client = _client(swarm, "a", "b", "c", "d")
    try:
        for _ in range(2):  # trained through the swarm
            optimizer.zero_grad()
            _loss(client.model.forward(IDS, adapters=lora)).backward()
            optimizer.step()
        with_lora = client.run(client.model.generate(PROMPT, NEW_TOKENS, adapter=lora))
        plain = client.run(client.model.generate(PROMPT, NEW_TOKENS))
        with_prompt = client.run(client.model.generate(PROMPT, NEW_TOKENS, adapter=prompt))
    finally:
        client.__exit__(None, None, None)
    local = load_local_model(swarm.checkpoint)
    expected = _local_greedy(local, PROMPT, lora)
    assert not torch.equal(expected, _local_greedy(local, PROMPT))  # the adapter changes the tokens
    assert torch.equal(with_lora, expected)
    assert torch.equal(plain, _local_greedy(local, PROMPT))
    assert torch.equal(with_prompt, _local_greedy(local, PROMPT, prompt=prompt))
    save_peft(lora, tmp_path / "trained")
    base = AutoModelForCausalLM.from_pretrained(swarm.checkpoint, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, tmp_path / "trained").generate(
            input_ids=PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert torch.equal(with_lora, theirs)


def test_server_sigkilled_mid_generation_is_replaced_and_gets_the_adapter(swarm):
    config = load_config(swarm.checkpoint)
    lora = LoraAdapters(config, LoraConfig(rank=2, targets=("k", "o", "up")), seed=9, init_b_std=0.3)
    expected = _local_greedy(load_local_model(swarm.checkpoint), PROMPT, lora)

    async def scenario():
        model = await swarm.connect(listing=("a", "b", "c", "d"))
        async with model, model.inference_session(PROMPT.shape[1] + NEW_TOKENS, adapter=lora) as session:
            opened_with = session.lora.uploads  # a new adapter: every server of the route got it
            pieces, killed = [PROMPT], None
            async for token in model.stream(PROMPT, NEW_TOKENS, session=session):
                pieces.append(token)
                if len(pieces) == 4:
                    killed = swarm.name_of(session.route[1][0])
                    swarm.servers[killed].kill()
            return torch.cat(pieces, dim=1), killed, session.failovers, opened_with, session.lora.uploads

    output, killed, failovers, opened_with, uploads = asyncio.run(scenario())
    assert killed in ("b", "d") and failovers == 1
    assert opened_with == 3 and uploads == 4  # the replacement was sent the adapter, then replayed into
    assert torch.equal(output, expected)


def _deep_gradients(forward, lora, deep) -> dict[str, torch.Tensor]:
    lora.zero_grad(set_to_none=True)
    deep.zero_grad(set_to_none=True)
    _loss(forward(IDS, lora, deep), deep.num_virtual_tokens).backward()
    grads = {name: p.grad.clone() for name, p in lora.named_parameters()}
    grads.update({name: p.grad.clone() for name, p in deep.named_parameters()})
    return grads


def test_deep_prompt_gradients_through_three_and_two_servers_equal_local(swarm):
    config = load_config(swarm.checkpoint)
    lora = LoraAdapters(config, LoraConfig(rank=2, targets=("q", "gate")), seed=5, init_b_std=0.05)
    deep = DeepPrompt(config, 3, seed=6, std=0.1)
    local = load_local_model(swarm.checkpoint)
    local.requires_grad_(False)
    expected = _deep_gradients(lambda ids, a, p: local_forward(local, ids, a, p), lora, deep)
    client = _client(swarm, "a", "c")

    def through_swarm():
        grads = _deep_gradients(
            lambda ids, a, p: client.model.forward(ids, adapters=a, prompts=p), lora, deep
        )
        return grads, [(span.start, span.end) for _, span in client.model.training.last_route]

    try:
        three, three_route = through_swarm()  # a 0:2, the living holder of 2:3, c 3:4
        swarm.join("e", "2:4")
        swarm.wait_online("e")
        wait_until_sync(lambda: client.run(client.model.list_servers()),
                        until=lambda servers: swarm.peer_ids["e"] in servers, what="the client to list e",
                        timeout=30)  # fmt: skip
        for name in ("b", "c", "d"):  # only a and e are left: blocks 2:4 fail over to e
            if swarm.servers[name].process.poll() is None:
                swarm.servers[name].kill()
        two, two_route = through_swarm()
    finally:
        client.__exit__(None, None, None)
    assert three_route == [(0, 2), (2, 3), (3, 4)] and two_route == [(0, 2), (2, 4)]
    for grads in (three, two):
        assert set(grads) == set(expected)
        for name in expected:
            assert expected[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5, msg=name)
