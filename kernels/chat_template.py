"""Render a model's chat template (Jinja) the way Hugging Face ``apply_chat_template`` does.

Chat templates come with checkpoints from anywhere, so they are untrusted code: they run
in Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to Python internals,
no mutation of the data passed in), with the same options and helpers transformers
gives them (``utils/chat_template_utils.py``): ``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``tojson`` that does not escape HTML, ``raise_exception``,
``strftime_now``, and the ``{% generation %}`` tag (rendered as its body). The context
holds ``messages``, ``add_generation_prompt``, ``tools``, ``documents``, ``bos_token``
and ``eos_token``; message keys whose value is None are dropped first (OpenAI clients
send ``content: null``), as transformers does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any


class ChatTemplateError(ValueError):
    """No chat template, or the template refused the conversation (fatal for this request)."""


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, so the sandbox sees no rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool | int | float):
        return value
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; we render its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja reads it as a class attribute)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not parse: {error}") from error


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    source: str = "this checkpoint",
    **extra: Any,
) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    Raises:
        ChatTemplateError: ``template`` is None (the message names ``source``), does not
            parse, or raised an error for this conversation (e.g. roles out of order).
    """
    import jinja2

    if not template:
        raise ChatTemplateError(
            f"{source} has no chat template (tokenizer_config.json 'chat_template', chat_template.jinja "
            "or GGUF tokenizer.chat_template): use plain completions, or a checkpoint with a template"
        )
    conversation = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"a chat message must be an object with 'role' and 'content', got {message!r}"
            )
        conversation.append({key: _plain(value) for key, value in message.items() if value is not None})
    context = {
        "messages": conversation,
        "add_generation_prompt": add_generation_prompt,
        "tools": _plain(list(tools)) if tools is not None else None,
        "documents": _plain(list(documents)) if documents is not None else None,
        **{key: _plain(value) for key, value in extra.items()},
    }
    # An unknown token stays undefined (renders as ""), as in transformers, never the text "None".
    context.update(
        {name: token for name, token in (("bos_token", bos_token), ("eos_token", eos_token)) if token}
    )
    try:
        return _compile(template).render(**context)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template refused this conversation: {error}") from error
