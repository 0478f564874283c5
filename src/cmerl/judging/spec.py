"""Building a judge from command-line flags: :class:`JudgeSpec`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cmerl.judging.api import OpenAIJudge
from cmerl.judging.local import LocalJudge
from cmerl.judging.prompt import DEFAULT_MAX_RESPONSE_CHARS, JudgePrompt


# --------------------------------------------------------------------------- building a judge from flags
@dataclass(frozen=True)
class JudgeSpec:
    """Everything needed to build a judge from command-line flags.

    name: a model name (local judge) or, with ``base_url``, the model name on the endpoint.
    """

    name: str
    base_url: str | None = None
    api: Literal["chat", "completions"] = "chat"
    api_key_env: str | None = None
    logprobs: bool = True
    top_logprobs: int = 5
    dtype: str = "auto"
    max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS
    max_batch_tokens: int = 8192
    template_tokenizer: str | None = None
    concurrency: int = 4
    prompt_path: str | None = None
    prefix_reuse: bool = False  # local judges: run the shared prompt prefix once (LocalJudge); endpoints ignore it

    def build(self) -> LocalJudge | OpenAIJudge:
        prompt = JudgePrompt.load(self.prompt_path)
        if self.base_url:
            return OpenAIJudge(self.base_url, self.name, api=self.api, api_key_env=self.api_key_env,
                               logprobs=self.logprobs, top_logprobs=self.top_logprobs, prompt=prompt,
                               max_response_chars=self.max_response_chars, concurrency=self.concurrency,
                               template_tokenizer=self.template_tokenizer)
        return LocalJudge.from_pretrained(self.name, dtype=self.dtype, prompt=prompt,
                                          max_response_chars=self.max_response_chars,
                                          max_batch_tokens=self.max_batch_tokens, prefix_reuse=self.prefix_reuse)
