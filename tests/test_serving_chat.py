"""Chat, GGUF and model identity over real `swarm join` processes: servers serve a GGUF file
with its Q8_0 weights kept as codes, and clients with the GGUF or the directory it came
from get local greedy output; ``chat`` uses the model's template and stops at any of
several end-of-sequence ids; the blocking facade gives the same; a client with another
config is refused, naming what differs; a wrong swarm name says no server was found."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from kernels import generate, load_local_model, load_tokenizer, render_chat
from kernels.gguf_export import write_gguf
from kernels.tiny import write_tiny_checkpoint
from swarm import ModelMismatch, NoRouteError
from swarm.serving import RemoteModel, Sampling, connect_sync
from tests.harness import ServingSwarm, client_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
MESSAGES = [{"role": "user", "content": "Say something."}]
TOKENS = 10


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("chat")
    directory = tmp_path / "model"
    write_tiny_checkpoint(directory, num_layers=4, hidden_size=64, chat_template=TEMPLATE)
    gguf = write_gguf(directory, tmp_path / "model.gguf", "Q8_0")
    swarm = ServingSwarm(tmp_path, gguf)
    try:
        swarm.join("a", "0:2", "--quant", "keep")
        swarm.join("b", "2:4", "--quant", "keep")
        swarm.wait_online("a", "b")
        swarm.directory = directory
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def reference(swarm):
    """Local greedy output of the chat prompt on the GGUF's kept-quantized weights."""
    tokenizer = load_tokenizer(swarm.checkpoint)
    text = render_chat(TEMPLATE, MESSAGES, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    ids = tokenizer.encode(text, add_special_tokens=False)
    model = load_local_model(swarm.checkpoint, keep_quantized=True)
    new = generate(model, torch.tensor([ids]), TOKENS)[0, len(ids) :].tolist()
    assert not set(new) & set(tokenizer.eos_token_ids), "pick another prompt: the reference ends early"
    return {"ids": ids, "new": new, "decode": tokenizer.decode}


def test_gguf_servers_and_clients_chat_equal_local(swarm, reference):
    async def scenario():
        async with await swarm.connect() as model:  # the client reads the GGUF too
            chat = await model.chat(MESSAGES, TOKENS)
            pieces = [piece async for piece in model.stream_chat(MESSAGES, TOKENS)]
            ids = await model.generate(torch.tensor([reference["ids"]]), TOKENS)
        async with RemoteModel.connect(
            swarm.directory, swarm.peers, config=client_config()
        ) as from_directory:
            return chat, pieces, ids, await from_directory.chat(MESSAGES, TOKENS)

    chat, pieces, ids, directory_chat = asyncio.run(scenario())
    expected = reference["decode"](reference["new"])
    assert chat == "".join(pieces) == expected
    assert ids[0, len(reference["ids"]) :].tolist() == reference["new"]
    assert directory_chat == expected  # same config hash: the folder's client uses the GGUF's servers


def test_any_of_several_eos_ids_ends_the_answer(swarm, reference, tmp_path):
    """generation_config.json lists two eos ids; one is a token the model says mid-answer."""
    directory = tmp_path / "model"
    shutil.copytree(swarm.directory, directory)
    new = reference["new"]
    at = next(k for k in range(1, len(new)) if new[k] not in new[:k])
    stop_id = new[at]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop_id, 1]}))

    async def scenario():
        async with RemoteModel.connect(directory, swarm.peers, config=client_config()) as model:
            assert stop_id in model.eos_token_ids
            return await model.chat(MESSAGES, TOKENS), await model.generate(
                torch.tensor([reference["ids"]]), TOKENS
            )

    chat, ids = asyncio.run(scenario())
    assert chat == reference["decode"](new[:at])
    assert ids[0, len(reference["ids"]) :].tolist() == new[: at + 1]


def test_blocking_facade_gives_the_same(swarm, reference):
    with connect_sync(swarm.checkpoint, swarm.peers, config=client_config()) as model:
        pieces = []
        for piece in model.stream_chat(MESSAGES, TOKENS):
            pieces.append(piece)
        text = model.chat(MESSAGES, TOKENS, sampling=Sampling(temperature=0.0))
        stopped_early = list(zip(range(1), model.stream_chat(MESSAGES, TOKENS), strict=False))
    assert "".join(pieces) == text == reference["decode"](reference["new"])
    assert len(stopped_early) == 1


def test_a_client_with_another_config_is_refused_naming_it(swarm, tmp_path):
    directory = tmp_path / "other"
    shutil.copytree(swarm.directory, directory)
    config = json.loads((directory / "config.json").read_text())
    config["rope_theta"] = 500000.0
    config["rope_parameters"]["rope_theta"] = 500000.0
    (directory / "config.json").write_text(json.dumps(config))

    async def connect_other():
        async with RemoteModel.connect(directory, swarm.peers, config=client_config()):
            pass

    with pytest.raises(ModelMismatch, match=r"rope_theta: 500000.0 here, 10000.0 there"):
        asyncio.run(connect_other())
    server = swarm.join("other", "0:4", "--model", str(directory))  # a server of it is refused at join
    assert "rope_theta: 500000.0 here, 10000.0 there" in server.wait_for_line("differs", timeout=120)
    assert server.process.wait(timeout=60) == 1

    async def skip_the_client_check():
        async with await swarm.connect() as model:
            model.servers.config_hash = "0123456789abcdef"  # as if it had another config
            await model.generate("hello", 2)

    with pytest.raises(Exception, match="config hash"):  # the servers refuse it too
        asyncio.run(skip_the_client_check())


def test_a_wrong_swarm_name_says_no_server_was_found(swarm):
    async def scenario():
        async with RemoteModel.connect(swarm.checkpoint, swarm.peers, swarm="not-this-one",
                                       config=client_config()) as model:  # fmt: skip
            await model.generate("hello", 2)

    with pytest.raises(NoRouteError, match="no server of swarm 'not-this-one' was found at all"):
        asyncio.run(scenario())


def test_swarm_generate_without_a_tokenizer_says_what_to_do(swarm, tmp_path):
    directory = tmp_path / "no-tokenizer"
    shutil.copytree(swarm.directory, directory)
    (directory / "tokenizer.json").unlink()
    process = swarm.start("generate-no-tokenizer", ["generate", "--model", str(directory), "--initial-peers",
                                                    *swarm.peers, "Once upon a time"])  # fmt: skip
    line = process.wait_for_line("tokenizer.json", timeout=120)
    assert "copy the model's tokenizer.json into it" in line and "pass token ids" not in line
    assert process.process.wait(timeout=60) == 2
