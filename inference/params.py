"""Sampling parameters: one validated dataclass that every path passes along."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 200
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class InvalidParams(ValueError):
    """A generation setting is out of range or unknown; the message names it."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already produced
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was already produced
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none reported; n: each produced token's logprob and the n most likely
    # Structured output, in OpenAI's shape: None (free text), {"type": "json_object"}, or {"type": "json_schema",
    # "json_schema": {"name", "schema", "strict"}}; normalised and checked here (inference/grammar.py), enforced
    # by constrained decoding. The Ollama routes map their `format` onto it.
    response_format: dict | None = field(default=None, hash=False)
    # Tool calling (inference/tools.py `ToolSet`: the functions offered, tool_choice, parallel_tool_calls):
    # rendered into the prompt, and with tool_choice "required" or a named function, enforced like a schema.
    tools: object | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        _check_number("max_tokens", self.max_tokens, 1, 1_000_000, integer=True)
        _check_number("temperature", self.temperature, 0.0, 5.0)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("top_k", self.top_k, 0, 1_000_000, integer=True)
        _check_number("repetition_penalty", self.repetition_penalty, 0.1, 10.0)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS, integer=True)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParams(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for item in self.stop:
            if not isinstance(item, str) or not item or len(item) > MAX_STOP_LENGTH:
                raise InvalidParams(f"stop: each stop string must be 1 to {MAX_STOP_LENGTH} characters")
        if self.response_format is not None:
            from .grammar import GrammarError, check_response_format

            try:
                object.__setattr__(self, "response_format", check_response_format(self.response_format))
            except GrammarError as error:
                raise InvalidParams(str(error)) from None
        if self.tools is not None:
            from .tools import ToolSet

            if isinstance(self.tools, dict):  # from to_dict()
                try:
                    object.__setattr__(self, "tools", ToolSet.from_dict(self.tools))
                except (KeyError, TypeError):
                    raise InvalidParams("tools: not a ToolSet's fields") from None
            if not isinstance(self.tools, ToolSet):
                raise InvalidParams("tools: must be a ToolSet (inference/tools.py parse_tool_request)")
        for name in ("max_tokens", "top_k", "seed", "logprobs"):  # JSON's 64.0 passes as whole; the decode loop needs an int
            value = getattr(self, name)
            if isinstance(value, float):
                object.__setattr__(self, name, int(value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Whether the tokens produced so far change the next token's logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_dict(cls, values: dict | None, *, max_tokens_limit: int | None = None) -> "GenerationParams":
        """Build from user input; unknown keys and wrong types fail with a clear message."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParams(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {k: v for k, v in values.items() if v is not None}
        if "stop" in values:
            stop = values["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else stop
            if not isinstance(values["stop"], tuple):
                raise InvalidParams("stop: must be a string or a list of strings")
        params = cls(**values)
        if max_tokens_limit and params.max_tokens > max_tokens_limit:
            raise InvalidParams(f"max_tokens: at most {max_tokens_limit} on this server, got {params.max_tokens}")
        return params

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stop": list(self.stop)}


def _check_number(name, value, low, high, *, integer=False, low_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParams(f"{name}: must be a number, got {type(value).__name__}")
    bound = f"greater than {low}" if low_open else f"at least {low}"
    if isinstance(value, int) and not low <= value <= high:  # before float(): a 400-digit int overflows it
        shown = value if abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"
        raise InvalidParams(f"{name}: must be {bound} and at most {high}, got {shown}")
    if integer and not float(value).is_integer():
        raise InvalidParams(f"{name}: must be a whole number, got {value}")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        raise InvalidParams(f"{name}: must be {bound} and at most {high}, got {value}")


SETTINGS_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "system_prompt", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "response_format")


def parse_settings(raw: str | dict | None) -> dict:
    """The `settings` argument of /chat: a JSON object string ("" = defaults), validated."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InvalidParams(f"settings must be a JSON object: {error.msg} at position {error.pos}") from None
    if not isinstance(raw, dict):
        raise InvalidParams("settings must be a JSON object, e.g. {\"temperature\": 0.2}")
    unknown = sorted(set(raw) - set(SETTINGS_KEYS))
    if unknown:
        raise InvalidParams(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(SETTINGS_KEYS)}")
    system_prompt = raw.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidParams("system_prompt: must be a string")
    GenerationParams.from_dict({k: v for k, v in raw.items() if k != "system_prompt"})  # validate now
    return dict(raw)


def split_settings(settings: dict, *, max_tokens_limit: int | None = None) -> tuple[GenerationParams, str | None]:
    """(sampling parameters, system prompt) from a validated settings dict."""
    sampling = {k: v for k, v in settings.items() if k != "system_prompt"}
    return GenerationParams.from_dict(sampling, max_tokens_limit=max_tokens_limit), settings.get("system_prompt")
