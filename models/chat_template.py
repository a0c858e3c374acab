"""Render a chat template (Jinja) the way transformers' tokenizers do, without importing transformers.

Importing transformers' renderer costs a fresh process ~1 s (the `transformers` package itself), more
than loading the bundled model; the SentencePiece tokenizer (models/spm_tokenizer.py) renders here.
What a template sees is what transformers gives it: a sandboxed, immutable Jinja environment with
`trim_blocks`/`lstrip_blocks` and loop controls; `tojson` without HTML escaping, `raise_exception`,
`strftime_now`, `dict` and a `namespace` that refuses underscore names; `{% generation %}` blocks
rendered as their body; messages, tools and documents rebuilt from plain JSON types (anything else
becomes a placeholder naming its type); a message's reasoning available as `reasoning_content` and
`thinking` whichever name it came under. tests/test_spm_tokenizer.py renders the same chats both ways.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime

import numpy as np

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat(template: str, messages: list[dict], tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_generation_prompt: bool = False, **variables) -> str:
    """`template` rendered for `messages` (dicts), with `variables` (bos_token, ...) visible to it.
    Tools are JSON schemas (dicts); transformers' options for training masks and continued messages are
    not supported here (refused rather than passed to the template as variables)."""
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise TypeError("tools must be JSON schemas (dicts)")
    for option in ("continue_final_message", "return_assistant_tokens_mask"):
        if variables.get(option):
            raise ValueError(f"{option} is not supported by this renderer")
    if documents is not None and not all(isinstance(document, dict) for document in documents):
        raise TypeError("documents must be dicts with 'title' and 'text' keys")
    chat = _plain(messages)
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
    return _compiled(template).render(messages=[_with_reasoning_aliases(message) for message in chat],
                                      tools=_plain(tools), documents=_plain(documents),
                                      add_generation_prompt=add_generation_prompt, **_plain(variables))


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value):
    """`value` rebuilt from JSON types: templates are untrusted code, and rich objects have methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind, base in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, kind):  # a subclass (an enum, ...) back to its base type and value
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):  # a numpy scalar (not an array)
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def prepare() -> None:
    """Import Jinja and build the environment now (~0.1 s), not on the first chat."""
    _environment()


@functools.lru_cache(maxsize=32)
def _compiled(template: str):
    return _environment().from_string(template)


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit()) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox escapes); "
                          f"this is {jinja2.__version__}: pip install -U jinja2")

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks the assistant's text for training masks): its body."""

        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (no reaching into Python internals)."""

        def __init__(*args, **kwargs):
            self, attributes = args[0], dict(*args[1:], **kwargs)
            for name in attributes:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                               dict=Dict(), namespace=Namespace)
    return environment
