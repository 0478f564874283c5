"""Request bodies of the reward service (pydantic), validated field by field so errors can name the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

#: Bounds of the per-request CME rules: a log-prob floor is a natural log <= 0, and both stay far from
#: float overflow however many tokens a response has (a sum of 10^6 floored tokens is still finite).
FLOOR_MIN, SCORE_ABS_MAX = -1e6, 1e6


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr


class TextItem(Strict):
    """A pair rendered by the server: ``prompt`` (string or chat messages) and ``response`` text."""

    prompt: StrictStr | list[Message]
    response: StrictStr


class TokenItem(Strict):
    """A pair rendered by the client: token ids, scored from ``response_start`` on."""

    input_ids: list[StrictInt]
    response_start: StrictInt = Field(ge=0)


def _item_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "tokens" if "input_ids" in value else "text"
    return "tokens" if isinstance(value, TokenItem) else "text"


Item = Annotated[Annotated[TextItem, Tag("text")] | Annotated[TokenItem, Tag("tokens")], Discriminator(_item_kind)]


class RenderBody(Strict):
    """A :class:`cmerl.formatting.RenderConfig` for the text items of one request."""

    system_prompt: StrictStr | None = None
    include_eos: StrictBool = False
    use_chat_template: StrictBool | None = None
    plain_template: StrictStr = "### Instruction:\n{prompt}\n\n### Response:\n"


class ScoreBody(Strict):
    """``POST /score``: items plus options. ``tokens`` returns per-token arrays; ``logprob_floor``,
    ``empty_score``, ``max_length`` and ``render`` (for text items) override the server's defaults for
    this request."""

    items: list[Item]
    entropy: StrictBool = False
    self_certainty: StrictBool = False
    tokens: StrictBool = False
    logprob_floor: float | None = Field(default=None, ge=FLOOR_MIN, le=0.0, allow_inf_nan=False)
    empty_score: float | None = Field(default=None, ge=-SCORE_ABS_MAX, le=SCORE_ABS_MAX, allow_inf_nan=False)
    max_length: StrictInt | None = Field(default=None, ge=2)
    render: RenderBody | None = None


class RewardBody(BaseModel):
    """``POST /get_reward`` (OpenRLHF): ``query`` = prompt + response as the actor decoded them."""

    model_config = ConfigDict(extra="ignore")
    query: list[StrictStr]
    prompts: list[StrictStr]
    labels: list[Any] | None = None


class CompletionBody(BaseModel):
    """The subset of vLLM's ``POST /v1/completions`` used for scoring (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: list[StrictInt] | list[list[StrictInt]] | StrictStr | list[StrictStr]
    prompt_logprobs: StrictInt | None = None
    max_tokens: StrictInt | None = Field(default=16, ge=0)
    echo: StrictBool = False
    stream: StrictBool = False
    add_special_tokens: StrictBool = True


class TokenizeBody(BaseModel):
    """vLLM's ``POST /tokenize`` (completion form)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


PromptMode = Literal["chat", "label", "verbatim"]
