"""`swarm api` as a real process over real `swarm join` servers, with the official `openai`
package as the client: completions and chat completions equal local greedy generation,
streaming in OpenAI's chunk shape with usage, n > 1, stop sequences, 16 concurrent chats
(batched on the servers), OpenAI errors (unknown model, malformed JSON, too many tokens,
wrong key, no route), a client that disconnects frees the servers' sessions, and a server
SIGKILLed mid-stream is invisible to the HTTP client."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
import torch

from kernels import generate, load_local_model, load_tokenizer, render_chat
from kernels.tiny import write_tiny_checkpoint
from swarm.serving import ClientConfig, RemoteModel
from swarm.serving.protocol import StatsRequest
from tests.harness import ServingSwarm, wait_until

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "test-key"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
PROMPT = "def add(a, b):"
TOKENS = 12
LONG = 64  # long enough that the answer is still being made when a server dies


class ApiSwarm(ServingSwarm):
    """`swarm join` servers and `swarm api` processes, all real."""

    def __init__(self, tmp_path, checkpoint):
        super().__init__(tmp_path, checkpoint)
        self.apis = {}

    def start_api(self, name: str, *extra: str) -> str:
        """Starts `swarm api` (port 0, key KEY, model id "tiny"); returns its base URL once ready."""
        self.apis[name] = process = self.start(name, [
            "api", "--model", str(self.checkpoint), "--initial-peers", *self.peers, "--port", "0",
            "--api-key", KEY, "--model-name", "tiny", *extra,
        ])  # fmt: skip
        line = process.wait_for_line("API ready at", timeout=120)
        return line.split("API ready at ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("api")
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=64, chat_template=TEMPLATE)
    swarm = ApiSwarm(tmp_path, checkpoint)
    try:
        for name, blocks in (("a", "0:2"), ("b", "2:4"), ("c", "2:4")):
            swarm.join(name, blocks)
        swarm.wait_online("a", "b", "c")
        swarm.url = swarm.start_api("api")
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def client(swarm):
    return openai.OpenAI(base_url=swarm.url, api_key=KEY, max_retries=0, timeout=120)


def _local_greedy(checkpoint, ids: list[int], tokens: int) -> str:
    """What a local greedy run says: the reference the API must equal."""
    tokenizer = load_tokenizer(checkpoint)
    output = generate(load_local_model(checkpoint), torch.tensor([ids]), tokens)[0, len(ids) :].tolist()
    ends = [i for i, token in enumerate(output) if token in tokenizer.eos_token_ids]
    return tokenizer.decode(output[: ends[0]] if ends else output)


@pytest.fixture(scope="module")
def expected(swarm):
    tokenizer = load_tokenizer(swarm.checkpoint)
    chat_text = render_chat(TEMPLATE, MESSAGES, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    chat_ids = tokenizer.encode(chat_text, add_special_tokens=False)
    return {
        "completion": _local_greedy(swarm.checkpoint, tokenizer.encode(PROMPT), TOKENS),
        "chat": _local_greedy(swarm.checkpoint, chat_ids, TOKENS),
        "chat_long": _local_greedy(swarm.checkpoint, chat_ids, LONG),
        "chat_prompt_tokens": len(chat_ids),
    }


def test_models_completions_and_chat_equal_local_greedy(client, expected):
    assert [model.id for model in client.models.list().data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert completion.choices[0].text == expected["completion"]
    assert completion.choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=TOKENS, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected["chat"]
    assert chat.usage.prompt_tokens == expected["chat_prompt_tokens"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_streaming_chat_has_openais_chunk_shape_and_usage(client, expected):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["chat"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected["chat_prompt_tokens"]
    assert len({c.id for c in chunks}) == 1
    completion = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True))  # fmt: skip
    assert completion == expected["completion"]


def test_n_choices_seed_and_stop_sequences(client, expected):
    options = dict(model="tiny", messages=MESSAGES, max_tokens=TOKENS, temperature=1.0, seed=7, n=3)
    first = client.chat.completions.create(**options)
    again = client.chat.completions.create(**options)
    assert sorted(choice.index for choice in first.choices) == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    text = expected["completion"]
    at = next(i for i in range(3, len(text) - 1) if text[i : i + 2].isalpha() and text[i : i + 2].isascii())
    stop = text[at : at + 2]
    cut = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=stop,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]


async def _server_stats(swarm):
    async with await RemoteModel.connect(
        swarm.checkpoint, swarm.peers, config=ClientConfig(route_wait=5)
    ) as model:
        servers = await model.list_servers()
        stats = {}
        for name, process in swarm.servers.items():
            if process.process.poll() is None and swarm.peer_ids[name] in servers:
                connection = await model.connection_to(servers[swarm.peer_ids[name]])
                stats[name] = await connection.call(StatsRequest(), timeout=10)
        return stats


def test_sixteen_concurrent_chats_are_batched_on_the_servers(swarm, expected):
    async def scenario():
        client = openai.AsyncOpenAI(base_url=swarm.url, api_key=KEY, max_retries=0, timeout=300)
        requests = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=TOKENS,
                                                   temperature=0) for _ in range(16)]  # fmt: skip
        return await asyncio.gather(*requests)

    before = asyncio.run(_server_stats(swarm))["a"].batched_steps
    answers = asyncio.run(scenario())
    assert [a.choices[0].message.content for a in answers] == [expected["chat"]] * 16
    assert asyncio.run(_server_stats(swarm))["a"].batched_steps > before


def _post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_errors_have_openais_shape_and_status(swarm, client):
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    status, body = _post(swarm.url + "/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10_000)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt=PROMPT, top_p=3)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny", prompt=PROMPT, presence_penalty=0.5)
    wrong = openai.OpenAI(base_url=swarm.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, body = _post(swarm.url + "/completions", b'"just a string"')
    assert status == 400 and "object" in body["error"]["message"]
    # None of that took the server down.
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0).choices
    with urllib.request.urlopen(swarm.url.removesuffix("/v1") + "/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(swarm.url.removesuffix("/v1") + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert 'swarm_api_requests_total{route="/v1/chat/completions",status="400"}' in metrics
    assert "swarm_api_time_to_first_token_seconds_count" in metrics


def test_no_route_is_a_503_naming_the_blocks(swarm):
    url = swarm.start_api("api-elsewhere", "--swarm", "nobody-here", "--route-wait", "2")
    status, body = _post(
        url + "/chat/completions", json.dumps({"model": "tiny", "messages": MESSAGES}).encode()
    )
    assert status == 503 and "blocks 0..3" in body["error"]["message"]
    assert swarm.apis["api-elsewhere"].terminate(timeout=60) == 0


async def _kill_or_drop_mid_stream(swarm, action: str, tokens: int):
    """Streams a chat; after a few chunks either SIGKILLs the 2:4 server holding the session
    (``action="kill"``) or drops the HTTP connection (``"drop"``). Returns the text received,
    the server's name and its sessions right then, and everyone's sessions a while after."""
    async with await RemoteModel.connect(
        swarm.checkpoint, swarm.peers, config=ClientConfig(route_wait=5)
    ) as probe:
        servers = await probe.list_servers()
        connections = {name: await probe.connection_to(servers[swarm.peer_ids[name]])
                       for name in ("a", "b", "c") if swarm.servers[name].process.poll() is None}  # fmt: skip

        async def sessions() -> dict[str, int]:
            return {
                name: (await c.call(StatsRequest(), timeout=10)).sessions for name, c in connections.items()
            }

        client = openai.AsyncOpenAI(base_url=swarm.url, api_key=KEY, max_retries=0, timeout=300)
        stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=tokens,
                                                      temperature=0, stream=True)  # fmt: skip
        pieces, chosen, during = [], None, {}
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if chosen is None and len(pieces) == 3:
                during = await sessions()
                chosen = next(name for name in ("b", "c") if during.get(name, 0) >= 1)
                if action == "drop":
                    await stream.close()
                    break
                swarm.servers[chosen].kill()
                del connections[chosen]
        after = await wait_until(sessions, until=lambda now: not any(now.values()), timeout=60,
                                 what="every server to have no open session")  # fmt: skip
        return "".join(pieces), chosen, during, after


def test_a_client_that_disconnects_frees_the_server_sessions(swarm):
    _, holder, during, after = asyncio.run(_kill_or_drop_mid_stream(swarm, "drop", 1500))
    assert during["a"] >= 1 and during[holder] >= 1
    assert not any(after.values()), after


def test_a_server_killed_mid_stream_is_invisible_to_the_client(swarm, expected):
    text, killed, _, _ = asyncio.run(_kill_or_drop_mid_stream(swarm, "kill", LONG))
    assert killed in ("b", "c") and swarm.servers[killed].process.poll() is not None
    assert text == expected["chat_long"]
