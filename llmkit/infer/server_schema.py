"""Request schemas, limits and errors of the OpenAI-compatible server (`server.py`).

Implements pydantic models for `/v1/completions`, `/v1/chat/completions` and `/tools/run` in strict
mode (a string where a number belongs is a 400, not silently coerced), with the ranges OpenAI
documents (temperature 0..2, top_p 0..1, at most 4 stop strings); unknown fields are ignored as
OpenAI-compatible servers do; `APIError` carries OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048  # cap on a request's max_tokens; also its default, clipped to the context
    max_n: int = 8
    max_concurrent: int = 256  # generations (n counts each) in flight or queued; 429 beyond
    max_body_bytes: int = 2_000_000


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"


class ToolCall(_Strict):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        d = {"role": self.role, "content": text}
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return d


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict = Field(default_factory=dict)


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at their neutral values only: a client asking for them must hear they are not applied
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None
    logit_bias: dict | None = None

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias", "logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by this server; leave it unset")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else (v or [])
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None


class ToolRunRequest(_Strict):
    name: str
    arguments: Union[str, dict] = "{}"
