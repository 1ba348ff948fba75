"""Chat templates render exactly as transformers' ``apply_chat_template`` for several
template styles (ChatML, Llama 3, Mistral with role checks, tools via tojson); the sandbox
holds; a checkpoint without a template gets a clear error; the template is read from
tokenizer_config.json, chat_template.jinja and GGUF metadata."""

from __future__ import annotations

import json

import pytest

from kernels import write_tiny_checkpoint
from kernels.chat_template import ChatTemplateError, render_chat
from kernels.gguf_export import write_gguf
from kernels.tokenizer import load_tokenizer

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string | default("26 Jul 2024") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
MISTRAL = """{{ bos_token }}{% for message in messages %}
  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {% endif %}
  {% if message['role'] == 'user' %}
    {{ '[INST] ' + message['content'] + ' [/INST]' }}
  {% elif message['role'] == 'assistant' %}
    {{ message['content'] + eos_token }}
  {% endif %}
{% endfor %}"""
TOOLS = """{% if tools %}{{ 'Tools: ' + tools | tojson + '\n' }}{% endif %}
{% for message in messages %}
{% if message.content is defined %}{{ message.role }}: {{ message.content }}
{% else %}{{ message.role }} calls {{ message.tool_calls | tojson(indent=2) }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}assistant:{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Hi <there> & 'you' — ✓"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "model"
    write_tiny_checkpoint(path, num_layers=1)
    return path


def _transformers_render(checkpoint, template: str, messages, **kwargs) -> str:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=template,
    )
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers(checkpoint, name, add_generation_prompt):
    template = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "tools": TOOLS}[name]
    messages = CONVERSATION[1:] if name == "mistral" else CONVERSATION
    kwargs = {}
    if name == "tools":
        messages = [*CONVERSATION, {"role": "assistant", "content": None,
                                    "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": "<2>"}}]}]  # fmt: skip
        kwargs["tools"] = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
    theirs = _transformers_render(checkpoint, template, messages, add_generation_prompt=add_generation_prompt,
                                  **kwargs)  # fmt: skip
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", **kwargs)  # fmt: skip
    assert ours == theirs
    assert ours  # rendered something


def test_template_errors_are_clear_and_the_sandbox_holds():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(MISTRAL, [{"role": "assistant", "content": "x"}], bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, CONVERSATION, source="model-dir")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", CONVERSATION)
    # Python internals are out of reach and the data passed in cannot be mutated.
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", CONVERSATION)
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.append(1) }}", CONVERSATION)


def test_template_is_read_from_every_place_a_checkpoint_keeps_it(checkpoint, tmp_path):
    assert load_tokenizer(checkpoint).chat_template is None
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHATML}))
    assert load_tokenizer(checkpoint).chat_template == CHATML
    gguf = write_gguf(checkpoint, tmp_path / "model.gguf")
    tokenizer = load_tokenizer(gguf)
    assert tokenizer.chat_template == CHATML
    config_path.write_text(json.dumps(config))
    (checkpoint / "chat_template.jinja").write_text(LLAMA3)
    assert load_tokenizer(checkpoint).chat_template == LLAMA3
    (checkpoint / "chat_template.jinja").unlink()
    # The special tokens of a rendered template encode as single tokens.
    text = render_chat(tokenizer.chat_template, CONVERSATION[1:2], bos_token=tokenizer.bos_token)
    ids = tokenizer.encode("<|begin_of_text|>" + text, add_special_tokens=False)
    assert ids[0] == tokenizer.backend.token_to_id("<|begin_of_text|>")
