"""models/chat_template.py renders chats as transformers' renderer does, in the same sandbox."""

from __future__ import annotations

import enum

import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from models.chat_template import render_chat
from models.templates import FALLBACK_FORMATS

RICH = (
    "{{ bos_token }}{% set ns = namespace(count=0, system='') %}"
    "{% if tools %}Tools: {{ tools | tojson }}\n{{ tools | tojson(indent=2, sort_keys=true) }}\n{% endif %}"
    "{% for m in messages %}"
    "  {% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "  {% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}"
    "  {% set ns.count = ns.count + 1 %}"
    "  <{{ m['role'] }}>{% if m.reasoning_content %}[think: {{ m.reasoning_content }} / {{ m.thinking }}]{% endif %}"
    "{% generation %}{{ m['content'] | trim }}{% endgeneration %}"
    "{% if m.tool_calls %}{% for call in m.tool_calls %}{{ call | tojson }}{% endfor %}{% endif %}"
    "{% if m['content'] == 'STOP' %}{% break %}{% endif %}\n"
    "{% endfor %}"
    "{% set d = dict(a=1, b='<x>') %}{{ d | tojson }} {{ dict.fromkeys(['k'], 0) | tojson }} "
    "{{ ns.count }} turns; system={{ ns.system }}; year {{ strftime_now('%Y')[:2] }}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class Mood(str, enum.Enum):
    CALM = "calm"


CHATS = [
    [{"role": "user", "content": "Hi <b>there</b> é ü 日本"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  padded  \n"},
     {"role": "assistant", "content": "Yes.", "reasoning": "short", "tool_calls": [
         {"type": "function", "function": {"name": "f", "arguments": {"x": 1, "y": [1.5, None, True]}}}]},
     {"role": "tool", "content": ("a", "b")}, {"role": "user", "content": Mood.CALM}],
    [{"role": "user", "content": "STOP"}, {"role": "user", "content": "never seen"}],
    [{"role": "assistant", "content": "x", "thinking": "deep", "reasoning_content": None}],
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find <things> \u00e9",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>"}


def theirs(template, messages, **kwargs):
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("generation", [False, True])
def test_a_rich_template_renders_as_transformers_renders_it(chat, tools, generation):
    ours = render_chat(RICH, chat, tools=tools, add_generation_prompt=generation, **SPECIALS)
    assert ours == theirs(RICH, chat, tools=tools, add_generation_prompt=generation, **SPECIALS)


@pytest.mark.parametrize("name", sorted(FALLBACK_FORMATS))
def test_the_fallback_templates_render_as_transformers_renders_them(name):
    template = FALLBACK_FORMATS[name].template
    for chat in CHATS:
        assert render_chat(template, chat, add_generation_prompt=True, **SPECIALS) == \
            theirs(template, chat, add_generation_prompt=True, **SPECIALS)


def test_the_template_can_refuse_a_chat():
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role robot"):
        render_chat(RICH, [{"role": "robot", "content": "beep"}], **SPECIALS)


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(_secret=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.__class__.__mro__ }}",
    "{{ messages.append(1) }}",
    "{{ ''.__class__.__subclasses__() }}",
])
def test_the_sandbox_holds(template):
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_what_it_does_not_do_is_refused():
    def lookup(query: str) -> str:
        """Find things."""
        return query

    with pytest.raises(TypeError, match="JSON schemas"):
        render_chat(RICH, CHATS[0], tools=[lookup])
    for option in ("continue_final_message", "return_assistant_tokens_mask"):
        with pytest.raises(ValueError, match=option):
            render_chat(RICH, CHATS[0], **{option: True})


def test_rich_objects_reach_the_template_as_placeholders():
    class Thing:
        def delete_everything(self):
            raise AssertionError("called")

    chat = [{"role": "user", "content": "x", "thing": Thing()}]
    template = "{{ messages[0].thing }}"
    assert render_chat(template, chat) == theirs(template, chat) == "<Thing>"
