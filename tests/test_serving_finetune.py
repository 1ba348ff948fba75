"""Fine-tuning through real `swarm join` processes on 127.0.0.1: gradients of LoRA and
soft-prompt parameters through 3 and 2 servers equal local autograd and `transformers` +
`peft` (float32, 1e-5); a trained adapter saved in the PEFT layout gives through `peft`
locally the logits the swarm gives; malformed backward requests (deep prompts and adapter
uploads included) get clear errors and
the server keeps serving; a server SIGKILLed between forward and backward, or before the
forward, is replaced with the same gradients; a request over a server's token budget is
refused as busy; `swarm finetune` trains, resumes and saves on Ctrl-C."""

from __future__ import annotations

import signal

import pytest
import torch

from kernels import load_config, load_local_model
from kernels.lora import LoraAdapters, LoraConfig, adapter_hash, load_peft, local_forward, save_peft
from kernels.prompt_tuning import SoftPrompt
from swarm.serving.protocol import PutAdapter, SpanBackward, SpanForward
from swarm.serving.remote_training import connect_in_thread
from tests.harness import client_config, three_server_swarm, wait_until_sync
from transport.errors import RemoteError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 64], [3, 9, 27, 81, 243, 11, 12, 13]])
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with three_server_swarm(tmp_path_factory.mktemp("finetune")) as swarm:
        yield swarm


def _client(swarm, *listing: str):
    client = connect_in_thread(swarm.checkpoint, swarm.peers, config=client_config())
    client.__enter__()
    try:
        wait_until_sync(
            lambda: client.run(client.model.list_servers()),
            until=lambda servers: all(swarm.peer_ids[name] in servers for name in listing),
            what=f"the client to list {listing}",
            timeout=30,
        )
    except BaseException:
        client.__exit__(None, None, None)
        raise
    return client


def _trainables(config, seed: int = 0):
    adapters = LoraAdapters(
        config, LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS), seed=seed, init_b_std=0.05
    )
    prompt = SoftPrompt(config, num_virtual_tokens=3, seed=seed, std=0.1)
    return adapters, prompt


def _loss(logits: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    # Next-token loss on the real tokens (the virtual positions carry no label).
    logits = logits[:, prompt_tokens:-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def _gradients(forward, adapters, prompt) -> dict[str, torch.Tensor]:
    adapters.zero_grad(set_to_none=True)
    prompt.zero_grad(set_to_none=True)
    _loss(forward(IDS, adapters, prompt), prompt.num_virtual_tokens).backward()
    grads = {name: p.grad.clone() for name, p in adapters.named_parameters()}
    grads["prompt"] = prompt.prompt_embeddings.grad.clone()
    return grads


def _local_gradients(checkpoint, adapters, prompt) -> dict[str, torch.Tensor]:
    model = load_local_model(checkpoint)
    model.requires_grad_(False)
    return _gradients(lambda ids, a, p: local_forward(model, ids, a, p), adapters, prompt)


def _reference_gradients(checkpoint, tmp_path, adapters, prompt) -> dict[str, torch.Tensor]:
    """The same gradients from `transformers` + `peft` (the adapter loaded from our PEFT files)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_peft(adapters, tmp_path / "reference-adapter")
    base = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "reference-adapter", is_trainable=True)
    soft = prompt.prompt_embeddings.detach().clone().requires_grad_(True)
    embeds = torch.cat([soft.expand(IDS.shape[0], -1, -1), base.get_input_embeddings()(IDS)], dim=1)
    _loss(model(inputs_embeds=embeds).logits, soft.shape[0]).backward()
    grads = {"prompt": soft.grad}
    for target, module in {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                           "down": "mlp.down_proj"}.items():  # fmt: skip
        for part in ("A", "B"):
            layers = [
                model.get_submodule(
                    f"base_model.model.model.layers.{i}.{module}.lora_{part}.default"
                ).weight.grad
                for i in range(load_config(checkpoint).num_layers)
            ]
            grads[f"tensors.{target}_{part}"] = torch.stack(layers)
    return grads


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].abs().sum() > 0, name  # a gradient that is all zero would prove nothing
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)


def test_gradients_through_three_servers_equal_local_and_peft(swarm, tmp_path):
    adapters, prompt = _trainables(load_config(swarm.checkpoint))
    client = _client(swarm, "a", "b", "c")
    try:
        route = client.run(client.model.training.client.route(0, 4))
        assert [swarm.name_of(server.peer_id) for server, _ in route] == ["a", "b", "c"]
        remote = _gradients(
            lambda ids, a, p: client.model.forward(ids, adapters=a, prompts=p), adapters, prompt
        )
        # A second step sends the unchanged adapters by hash only.
        again = _gradients(
            lambda ids, a, p: client.model.forward(ids, adapters=a, prompts=p), adapters, prompt
        )
        # Every backward used the activations its forward kept on the server.
        assert client.model.training.client.reused_forwards == 2 * len(route)
    finally:
        client.__exit__(None, None, None)
    local = _local_gradients(swarm.checkpoint, adapters, prompt)
    _assert_same(remote, local)
    _assert_same(again, local)
    _assert_same(local, _reference_gradients(swarm.checkpoint, tmp_path, adapters, prompt))


def test_trained_adapter_loaded_with_peft_gives_swarm_logits(swarm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = LoraAdapters(load_config(swarm.checkpoint), LoraConfig(rank=8, targets=("q", "v")))
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    client = _client(swarm, "a", "b", "c")
    try:
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = _loss(client.model.forward(IDS, adapters=adapters), 0)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            swarm_logits = client.model.forward(IDS, adapters=adapters)
    finally:
        client.__exit__(None, None, None)
    assert losses[-1] < losses[0]
    save_peft(adapters, tmp_path / "trained")
    base = AutoModelForCausalLM.from_pretrained(swarm.checkpoint, torch_dtype=torch.float32)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "trained")(IDS).logits
    torch.testing.assert_close(swarm_logits, peft_logits, rtol=0, atol=1e-5)


def test_finetune_command_trains_saves_resumes_and_saves_on_ctrl_c(swarm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data.txt"
    data.write_text("def add(a, b):\n    return a + b\n\n" * 20)
    out = tmp_path / "adapter"
    command = ["finetune", "--model", str(swarm.checkpoint), "--initial-peers", *swarm.peers, "--data", str(data),
               "--method", "lora", "--rank", "4", "--targets", "q,v,down", "--batch", "2", "--seq-len", "16",
               "--lr", "1e-2", "--out", str(out)]  # fmt: skip
    first = swarm.start("finetune-1", [*command, "--steps", "3"])
    assert first.process.wait(timeout=180) == 0, first.tail(20)
    assert "tokens/s" in first.wait_for_line("step 3/3 loss", timeout=30)
    base = AutoModelForCausalLM.from_pretrained(swarm.checkpoint, torch_dtype=torch.float32)
    PeftModel.from_pretrained(base, out)  # the PEFT layout loads
    resumed = swarm.start("finetune-2", [*command, "--steps", "5"])
    assert resumed.process.wait(timeout=180) == 0, resumed.tail(20)
    resumed.wait_for_line("at step 3", timeout=30)
    resumed.wait_for_line("done: 5 steps", timeout=30)
    assert not any("step 1/5" in line for line in resumed.lines)

    # `swarm generate --adapter` continues greedily as the same adapter does locally.
    generate = swarm.start("generate", ["generate", "--model", str(swarm.checkpoint), "--initial-peers", *swarm.peers,
                                        "--adapter", str(out), "--max-new-tokens", "5", "def add("])  # fmt: skip
    assert generate.process.wait(timeout=120) == 0, generate.tail(20)
    expected = _local_greedy(swarm.checkpoint, out, "def add(", 5)
    wait_until_sync(lambda: "".join(generate.lines), until=lambda text: text.endswith(expected + "\n"),
                    what=f"the output to end with {expected!r}", timeout=30)  # fmt: skip

    interrupted = swarm.start("finetune-3", [*command, "--steps", "1000", "--save-every", "0"])
    interrupted.wait_for_line("step 7/1000", timeout=180)
    interrupted.process.send_signal(signal.SIGINT)
    assert interrupted.process.wait(timeout=60) == 130
    saved = torch.load(out / "training_state.pt", weights_only=True)["step"]
    assert saved >= 7
    interrupted.wait_for_line(f"saved step {saved}", timeout=30)


def _local_greedy(checkpoint, adapter_dir, prompt: str, new_tokens: int) -> str:
    from tokenizers import Tokenizer

    model = load_local_model(checkpoint)
    adapters = load_peft(model.config, adapter_dir)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, local_forward(model, ids, adapters)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0, start:].tolist())


def test_malformed_backward_requests_get_clear_errors_and_server_keeps_serving(swarm):
    config = load_config(swarm.checkpoint)
    adapters = LoraAdapters(config, LoraConfig(rank=2, targets=("q",))).span_tensors(0, 2)
    adapters = {name: tensor.detach() for name, tensor in adapters.items()}
    hidden = torch.randn(1, 5, 64)
    client = _client(swarm, "a")

    async def call(message):
        servers = await client.model.list_servers()
        connection = await client.model.connection_to(servers[swarm.peer_ids["a"]])
        return await connection.call(message, timeout=10)

    def backward(**changes):
        fields = dict(start=0, end=2, hidden=hidden, grad_output=torch.ones(1, 5, 64), adapters=adapters,
                      lora_scaling=2.0)  # fmt: skip
        return SpanBackward(**{**fields, **changes})

    wrong_adapter = {**adapters, "q.A": torch.zeros(2, 3, 64)}
    cases = {
        "grad_output must have the shape": backward(grad_output=torch.ones(1, 4, 64)),
        "hidden holds NaN": backward(hidden=torch.full((1, 5, 64), float("nan"))),
        "grad_output holds NaN": backward(grad_output=torch.full((1, 5, 64), float("nan"))),
        "adapter q.[AB] must have shape": backward(adapters=wrong_adapter),
        "A/B pairs": backward(adapters={"q.A": adapters["q.A"]}),
        "does not match": backward(adapter_hash=b"x" * 16),
        "hidden must be float": backward(hidden=torch.ones(1, 5, 32)),
        "not inside this server's span": backward(start=2, end=4),
        "prompts must have shape": backward(prompts=torch.zeros(3, 2, 64)),
        "prompts holds NaN": backward(prompts=torch.full((2, 2, 64), float("nan"))),
        "adapters: adapter q.[AB] must have": PutAdapter(
            start=0, end=2, adapters=wrong_adapter, lora_scaling=2.0
        ),
    }
    try:
        for expected, message in cases.items():
            with pytest.raises(RemoteError, match=expected) as raised:
                client.run(call(message))
            assert not raised.value.retryable, expected
        with pytest.raises(RemoteError, match="AdapterNotCached") as raised:
            client.run(call(backward(adapters=None, adapter_hash=b"y" * 16)))
        assert raised.value.retryable
        good = client.run(call(backward()))
        assert good.grad_hidden.shape == (1, 5, 64) and set(good.grad_adapters) == {"q.A", "q.B"}
        # The adapters are now cached: the hash alone is enough.
        key = adapter_hash(adapters, 2.0)
        cached = client.run(call(backward(adapters=None, adapter_hash=key)))
        torch.testing.assert_close(cached.grad_hidden, good.grad_hidden, rtol=0, atol=0)
        forward = client.run(
            call(SpanForward(start=0, end=2, hidden=hidden, adapter_hash=key, lora_scaling=2.0))
        )
        assert forward.hidden.shape == (1, 5, 64)
    finally:
        client.__exit__(None, None, None)
    assert swarm.servers["a"].process.poll() is None


def test_server_killed_between_forward_and_backward_is_replaced_with_same_gradients(swarm):
    swarm.join("d", "2:3")
    swarm.wait_online("d")
    adapters, prompt = _trainables(load_config(swarm.checkpoint), seed=1)
    expected = _local_gradients(swarm.checkpoint, adapters, prompt)
    client = _client(swarm, "a", "b", "c", "d")
    try:
        training = client.model.training
        adapters.zero_grad(set_to_none=True)
        prompt.zero_grad(set_to_none=True)
        logits = client.model.forward(IDS, adapters=adapters, prompts=prompt)
        used = [peer for peer, span in training.last_route if span.start == 2]
        killed = swarm.name_of(used[0])
        swarm.servers[killed].kill()
        _loss(logits, prompt.num_virtual_tokens).backward()
        failovers = training.client.failovers
        reused = training.client.reused_forwards
    finally:
        client.__exit__(None, None, None)
    grads = {name: p.grad for name, p in adapters.named_parameters()}
    grads["prompt"] = prompt.prompt_embeddings.grad
    assert failovers == 1
    assert reused == 2  # a and c kept theirs; the replacement of the killed server recomputed
    _assert_same(grads, expected)


def test_two_servers_a_request_over_budget_and_a_server_killed_before_the_forward(swarm):
    swarm.join("e", "2:4")
    swarm.join("tight", "0:1", "--cache-tokens", "8")
    swarm.wait_online("e", "tight")
    adapters, prompt = _trainables(load_config(swarm.checkpoint), seed=2)
    client = _client(swarm, "e", "tight")
    try:
        remote = _gradients(
            lambda ids, a, p: client.model.forward(ids, adapters=a, prompts=p), adapters, prompt
        )
        route = [swarm.name_of(peer) for peer, _ in client.model.training.last_route]

        async def over_budget():
            servers = await client.model.list_servers()
            connection = await client.model.connection_to(servers[swarm.peer_ids["tight"]])
            return await connection.call(
                SpanForward(start=0, end=1, hidden=torch.randn(2, 5, 64)), timeout=10
            )

        with pytest.raises(RemoteError, match="exceed this server's budget") as raised:
            client.run(over_budget())
        assert raised.value.retryable
        # e dies before the next forward (the listing still shows it): the client bans it and
        # runs blocks 2:4 on the chain of the surviving 2:3 holder and c, forward and backward.
        swarm.servers["e"].kill()
        after_kill = _gradients(
            lambda ids, a, p: client.model.forward(ids, adapters=a, prompts=p), adapters, prompt
        )
        failovers = client.model.training.client.failovers
    finally:
        client.__exit__(None, None, None)
    assert route == ["a", "e"]
    assert failovers >= 1
    expected = _local_gradients(swarm.checkpoint, adapters, prompt)
    _assert_same(remote, expected)
    _assert_same(after_kill, expected)
