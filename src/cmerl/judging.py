"""Pairwise judges: a local causal LM or an OpenAI-compatible endpoint compares two responses, both orders.

Vocabulary: the two *systems* being compared are ``a`` and ``b`` (the A and B outputs files); the two
*positions* in the judge prompt are ``A`` (shown first) and ``B``. Every pair is judged twice, in order
``ab`` (system a shown as Response A) and ``ba`` (system b shown as Response A).

How one order is judged:

* **Log-prob mode** (local models; endpoints that return logprobs): the assistant turn is pre-filled with
  the prompt file's prefill ("The better response is Response") and the judge's log-probs of the two
  choice tokens ``" A"`` and ``" B"`` are read. The order's margin for system a is ``logprob_A - logprob_B``
  in order ``ab`` and ``logprob_B - logprob_A`` in order ``ba``; the pair's margin is their sum (nats of
  log-odds), which cancels a constant position bias.
* **Parse mode** (endpoints without logprobs): the judge's text must say "The better response is
  Response A|B" (or be the bare letter); anything else is retried once and then recorded as an error.

Decision (MT-Bench convention, :class:`DecisionRule`): in log-prob mode the pair goes to the system its
summed margin favours unless ``|margin| < threshold`` (then a tie), and, with ``require_consistent``,
unless the two orders disagree (also a tie). In parse mode the two orders must agree, else it is a tie.
An error in either order makes the pair an error: excluded from win rates, never a win.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

import torch

from cmerl.fingerprint import RunMismatchError
from cmerl.formatting import RenderConfig, render_context, uses_chat_template
from cmerl.io import append_jsonl, iter_jsonl

Letter = Literal["A", "B"]
VERDICTS_KIND = "cmerl.verdicts"
DEFAULT_PROMPT = "pairwise_judge.txt"
DEFAULT_THRESHOLD = 0.2
DEFAULT_MAX_RESPONSE_CHARS = 3000
TRUNCATION_MARK = "\n[... truncated]"


# --------------------------------------------------------------------------- the prompt
def read_prompt_sections(path: str | Path | None, packaged: str, kind: str) -> tuple[str, str, dict[str, str]]:
    """``(text, source, sections)`` of a judge prompt file: ``path``, or the packaged ``prompts/<packaged>``
    when None. Sections are opened by lines ``<<<system>>>``, ``<<<user>>>`` and ``<<<assistant_prefill>>>``;
    a missing file or section raises naming it (``kind`` says which prompt, for the message)."""
    if path is None:
        text = resources.files("cmerl").joinpath("prompts", packaged).read_text(encoding="utf-8")
        source = f"cmerl/prompts/{packaged}"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"judge prompt file not found: {p}")
        text, source = p.read_text(encoding="utf-8"), str(p)
    parts = re.split(r"^<<<(system|user|assistant_prefill)>>>[ \t]*\n", text, flags=re.MULTILINE)
    sections = dict(zip(parts[1::2], parts[2::2]))
    missing = [s for s in ("system", "user", "assistant_prefill") if s not in sections]
    if missing:
        raise ValueError(f"{kind} {source} lacks section(s) {missing}; open each with a line "
                         "<<<system>>>, <<<user>>>, <<<assistant_prefill>>>")
    return text, source, sections


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt: system text, a user template with ``{instruction}``, ``{response_a}``,
    ``{response_b}``, and the assistant prefill whose continuation is the choice letter."""

    system: str
    user: str
    prefill: str
    text: str  # the whole file, recorded in every verdicts file
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, path: str | Path | None = None) -> JudgePrompt:
        """Load a prompt file (default: the packaged ``prompts/pairwise_judge.txt``).

        The file has three sections, each opened by a line ``<<<system>>>``, ``<<<user>>>`` and
        ``<<<assistant_prefill>>>``; the user section must hold the three placeholders.
        """
        text, source, sections = read_prompt_sections(path, DEFAULT_PROMPT, "judge prompt")
        user = sections["user"].strip("\n")
        for ph in ("{instruction}", "{response_a}", "{response_b}"):
            if ph not in user:
                raise ValueError(f"judge prompt {source}: the user section must contain {ph}")
        prefill = sections["assistant_prefill"].strip("\n").rstrip()
        return cls(sections["system"].strip("\n"), user, prefill, text, source)

    def user_message(self, instruction: str, response_a: str, response_b: str) -> str:
        """The user turn with the placeholders filled in one pass (braces inside responses are safe)."""
        values = {"instruction": instruction, "response_a": response_a, "response_b": response_b}
        return re.sub(r"\{(instruction|response_a|response_b)\}", lambda m: values[m.group(1)], self.user)

    def messages(self, instruction: str, response_a: str, response_b: str) -> list[dict]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user_message(instruction, response_a, response_b)}]

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "text": self.text}


_VERDICT_LINE = re.compile(r"better\s+response\s+is\s*:?\s*\**\s*(?:response\s*)?\**\s*\[*\s*([AB])\b",
                           re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:response\s+)?\[*\s*([AB])\s*\]*\W*$", re.IGNORECASE)


def parse_verdict(text: str) -> Letter | None:
    """The letter a judge's text picks: "The better response is Response A" (last such line wins) or a
    bare "A"/"B" (as after a pre-filled prefix); ``None`` when it says neither. Case-sensitive letters."""
    hits = [m.group(1) for m in _VERDICT_LINE.finditer(text) if m.group(1) in "AB"]
    if hits:
        return hits[-1]  # type: ignore[return-value]
    m = _BARE.match(text.strip())
    if m and m.group(1) in "AB":
        return m.group(1)  # type: ignore[return-value]
    return None


def truncate_response(text: str, max_chars: int) -> str:
    """Cut a response to ``max_chars`` characters, marking the cut; ``max_chars <= 0`` keeps it whole."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + TRUNCATION_MARK


# --------------------------------------------------------------------------- one order's result
@dataclass
class Job:
    """One judge call: the instruction and the two responses in the positions shown."""

    instruction: str
    response_A: str
    response_B: str


@dataclass
class OrderResult:
    """What a judge said about one order. ``choice`` is the letter picked (argmax of the two log-probs in
    log-prob mode, parsed otherwise), ``None`` when unusable; ``logprob_A``/``logprob_B`` are natural-log
    probabilities of the choice tokens (``None`` in parse mode); ``raw`` is the judge's text output."""

    choice: Letter | None
    logprob_A: float | None = None
    logprob_B: float | None = None
    raw: str = ""
    error: str | None = None
    attempts: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def has_logprobs(self) -> bool:
        return self.logprob_A is not None and self.logprob_B is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


class Judge(Protocol):
    """Anything that judges a list of jobs, one :class:`OrderResult` each, in order."""

    name: str

    def settings(self) -> dict: ...

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]: ...


def judge_concurrently(judge_one: Callable[[Job], OrderResult], jobs: Sequence[Job], concurrency: int,
                       progress: Callable[[int], None] | None = None) -> list[OrderResult]:
    """``judge_one`` on every job with ``concurrency`` threads (API judges: one request per job), results in
    job order; ``progress(1)`` after each."""
    with ThreadPoolExecutor(concurrency) as pool:
        results = []
        for r in pool.map(judge_one, jobs):
            results.append(r)
            if progress:
                progress(1)
    return results


# --------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class DecisionRule:
    """threshold: a pair whose summed margin (nats) has ``|margin| < threshold`` is a tie (log-prob mode);
    require_consistent: also call it a tie when the two orders prefer different systems."""

    threshold: float = DEFAULT_THRESHOLD
    require_consistent: bool = False

    def __post_init__(self) -> None:
        if self.threshold < 0 or math.isnan(self.threshold):
            raise ValueError(f"threshold must be >= 0 (got {self.threshold})")


def preferred_system(order: str, choice: Letter | None) -> str | None:
    """System ("a"/"b") behind the letter picked in ``order`` ("ab" or "ba")."""
    if choice is None:
        return None
    return order[0] if choice == "A" else order[1]


def order_margin(order: str, r: OrderResult) -> float | None:
    """Log-odds for system a in one order (positive: a preferred); ``None`` without log-probs."""
    if not r.has_logprobs:
        return None
    d = r.logprob_A - r.logprob_B  # type: ignore[operator]
    return d if order == "ab" else -d


def decide(ab: OrderResult, ba: OrderResult, rule: DecisionRule = DecisionRule()) -> tuple[str, float | None, bool | None]:
    """``(verdict, margin, consistent)`` of a pair from its two orders; see module docstring."""
    if ab.error or ba.error or ab.choice is None or ba.choice is None:
        return "error", None, None
    pa, pb = preferred_system("ab", ab.choice), preferred_system("ba", ba.choice)
    consistent = pa == pb
    if ab.has_logprobs and ba.has_logprobs:
        margin = order_margin("ab", ab) + order_margin("ba", ba)  # type: ignore[operator]
        if abs(margin) < rule.threshold or margin == 0 or (rule.require_consistent and not consistent):
            return "tie", margin, consistent
        return ("a" if margin > 0 else "b"), margin, consistent
    return (pa if consistent else "tie"), None, consistent  # type: ignore[return-value]


# --------------------------------------------------------------------------- local judge
class LocalJudge:
    """A causal LM judging in log-prob mode: one forward pass per (pair, order), no sampling.

    The context is the chat-templated ``[system, user]`` turns plus the prefill (the plain format for
    tokenizers without a chat template); the two candidates are the tokens that ``prefill + " A"`` and
    ``prefill + " B"`` add. Contexts are right-padded into length-sorted batches bounded by
    ``max_batch_tokens`` (rows x padded length); the output projection runs on the last position only.
    """

    def __init__(self, model, tokenizer, *, name: str | None = None, prompt: JudgePrompt | None = None,
                 max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS, max_batch_tokens: int = 8192,
                 render: RenderConfig = RenderConfig(), dtype: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.prompt = prompt or JudgePrompt.load()
        self.max_response_chars = int(max_response_chars)
        self.max_batch_tokens = int(max_batch_tokens)
        self.render_config = render
        self.dtype = dtype or str(next(model.parameters()).dtype).replace("torch.", "")
        self.progress: Callable[[int], None] | None = None  # called with the number of jobs just done
        self._head_fp32: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def from_pretrained(cls, name: str, *, dtype: str = "auto", **kwargs) -> LocalJudge:
        """Load a judge by model name (packaged alias, HF folder, .gguf, hub id). ``dtype`` ``auto``: bf16
        where the hardware runs it natively, else fp32 (:mod:`cmerl.precision`); the settings record the
        setting as given, so a run resumed on another kind of CPU under ``auto`` is not refused."""
        from cmerl.models import load_model

        model, tok = load_model(name, dtype=dtype, role="judge")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, tok, name=name, dtype=dtype, **kwargs)

    def settings(self) -> dict:
        return {"kind": "local", "model": self.name, "dtype": self.dtype, "mode": "logprobs",
                "max_response_chars": self.max_response_chars,
                "chat_template": uses_chat_template(self.tokenizer, self.render_config),
                "choices": [" A", " B"]}

    def _encode(self, text: str) -> list[int]:
        chat = uses_chat_template(self.tokenizer, self.render_config)
        return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def encode_job(self, job: Job) -> tuple[list[int], int, int]:
        """``(context_ids, id_A, id_B)``: the context up to the choice token and the two candidates."""
        msgs = self.prompt.messages(job.instruction, truncate_response(job.response_A, self.max_response_chars),
                                    truncate_response(job.response_B, self.max_response_chars))
        context = render_context(self.tokenizer, msgs, self.render_config) + self.prompt.prefill
        ids_a, ids_b = self._encode(context + " A"), self._encode(context + " B")
        p = 0
        while p < min(len(ids_a), len(ids_b)) and ids_a[p] == ids_b[p]:
            p += 1
        if not (len(ids_a) == len(ids_b) == p + 1):
            raise ValueError(f"judge tokenizer of {self.name!r} does not encode the choices ' A' / ' B' as one "
                             f"token each after the prefill {self.prompt.prefill!r}; change the prompt's prefill")
        return ids_a[:p], ids_a[p], ids_b[p]

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        from cmerl.scoring.local import plan_batches

        encoded = [self.encode_job(j) for j in jobs]
        results: list[OrderResult | None] = [None] * len(jobs)
        for batch in plan_batches([len(e[0]) for e in encoded], self.max_batch_tokens):
            for i, (la, lb, mass) in zip(batch, self._choice_logprobs([encoded[i] for i in batch])):
                if math.isnan(la) or math.isnan(lb):
                    results[i] = OrderResult(None, raw="", error="judge returned NaN log-probs")
                else:
                    choice: Letter = "A" if la >= lb else "B"
                    results[i] = OrderResult(choice, la, lb, raw=choice, extra={"choice_mass": mass})
            if self.progress:
                self.progress(len(batch))
        return results  # type: ignore[return-value]

    def _choice_logprobs(self, items: list[tuple[list[int], int, int]]) -> list[tuple[float, float, float]]:
        """Per item: log p(id_A | context), log p(id_B | context) and p(A) + p(B), float32."""
        logp = self.next_token_logprobs([ids for ids, _, _ in items])
        out = []
        for r, (_, ia, ib) in enumerate(items):
            la, lb = float(logp[r, ia]), float(logp[r, ib])
            out.append((la, lb, math.exp(la) + math.exp(lb)))
        return out

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        """``(len(contexts), vocab)`` float32 natural-log next-token distribution after each context (one
        right-padded forward pass; the output projection runs on the last position only, in float32)."""
        model = self.model
        width = max(len(ids) for ids in contexts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for r, ids in enumerate(contexts):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
        hidden = model.get_decoder()(input_ids=input_ids.to(model.device),
                                     attention_mask=mask.to(model.device)).last_hidden_state
        last = torch.tensor([len(ids) - 1 for ids in contexts], device=hidden.device)
        h = hidden[torch.arange(len(contexts), device=hidden.device), last]  # (rows, hidden)
        head = model.get_output_embeddings()
        if self._head_fp32 is None or self._head_fp32[0].device != head.weight.device:
            bias = getattr(head, "bias", None)
            self._head_fp32 = (head.weight.detach().float(), None if bias is None else bias.detach().float())
        logits = torch.nn.functional.linear(h.float(), *self._head_fp32)  # float32 log-probs
        if getattr(model.config, "logit_scale", None):
            logits = logits * model.config.logit_scale
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------- OpenAI-compatible judge
class JudgeConnectionError(RuntimeError):
    """The judge endpoint could not be reached or refused the request (not a judging error)."""


class OpenAIJudge:
    """A judge behind an OpenAI-compatible API (vLLM, llama.cpp server, OpenAI, ...).

    api="completions": the prompt is rendered to text (with ``template_tokenizer``'s chat template when
    given, else as plain ``system\\n\\nuser\\n\\n``) plus the prefill; one token is requested with
    ``logprobs=top_logprobs``; the letter's log-probs are read from the returned top list.
    api="chat": ``[system, user]`` messages; up to ``max_tokens`` tokens with ``logprobs: true`` and
    ``top_logprobs``; the letter token after "Response" (or a bare letter) gives the log-probs.
    Without logprobs in the answer (or with ``logprobs=False``) the text is parsed (parse mode). A letter
    missing from a top list gets the smallest listed log-prob as an upper bound (``extra.bounded``).
    The API key is read from the environment variable ``api_key_env`` (never stored).
    """

    def __init__(self, base_url: str, model: str, *, api: Literal["chat", "completions"] = "chat",
                 api_key_env: str | None = None, logprobs: bool = True, top_logprobs: int = 5,
                 max_tokens: int = 16, timeout: float = 120.0, concurrency: int = 4, retries: int = 3,
                 prompt: JudgePrompt | None = None, max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
                 template_tokenizer: str | None = None):
        import httpx

        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions' (got {api!r})")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL must start with http:// or https:// (got {base_url!r})")
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env} (the judge API key) is not set or empty")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.api = api
        self.api_key_env = api_key_env
        self.logprobs = logprobs
        self.top_logprobs = int(top_logprobs)
        self.max_tokens = int(max_tokens)
        self.concurrency = max(1, int(concurrency))
        self.retries = int(retries)
        self.prompt = prompt or JudgePrompt.load()
        self.max_response_chars = int(max_response_chars)
        self.template_tokenizer = template_tokenizer
        self._tok = None
        if template_tokenizer:
            from cmerl.models import load_tokenizer

            self._tok = load_tokenizer(template_tokenizer)
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self.progress: Callable[[int], None] | None = None

    def settings(self) -> dict:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model, "api": self.api,
                "api_key_env": self.api_key_env, "mode": "logprobs" if self.logprobs else "parse",
                "top_logprobs": self.top_logprobs, "temperature": 0.0,
                "max_tokens": 1 if self.api == "completions" else self.max_tokens,
                "max_response_chars": self.max_response_chars, "template_tokenizer": self.template_tokenizer}

    def close(self) -> None:
        self._client.close()

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        return judge_concurrently(self._judge_one, jobs, self.concurrency, self.progress)

    # -- requests
    def _post(self, path: str, body: dict) -> dict:
        import httpx

        url = self.base_url + path
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.post(url, json=body)
            except httpx.TransportError as exc:
                last = exc
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise JudgeConnectionError(f"judge endpoint {url} returned non-JSON: {resp.text[:200]!r}")
                if resp.status_code not in (429, 500, 502, 503, 504):
                    raise JudgeConnectionError(f"judge endpoint {url} answered HTTP {resp.status_code}: "
                                               f"{resp.text[:300]}")
                last = RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            if attempt < self.retries:
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise JudgeConnectionError(f"judge endpoint {url} failed after {self.retries + 1} tries: {last}")

    def _texts(self, job: Job) -> list[dict]:
        return self.prompt.messages(job.instruction, truncate_response(job.response_A, self.max_response_chars),
                                    truncate_response(job.response_B, self.max_response_chars))

    def _judge_one(self, job: Job) -> OrderResult:
        msgs = self._texts(job)
        if self.api == "completions":
            if self._tok is not None:
                text = render_context(self._tok, msgs) + self.prompt.prefill
            else:
                text = f"{msgs[0]['content']}\n\n{msgs[1]['content']}\n\n{self.prompt.prefill}"
            body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
            if self.logprobs:
                body["logprobs"] = self.top_logprobs
            data = self._post("/completions", body)
            choice = (data.get("choices") or [{}])[0]
            raw = choice.get("text") or ""
            tops = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] if self.logprobs else None
            top_list = [(k, v) for k, v in tops.items()] if isinstance(tops, dict) else None
            return _result_from(raw, top_list)
        body = {"model": self.model, "messages": msgs, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        data = self._post("/chat/completions", body)
        choice = (data.get("choices") or [{}])[0]
        raw = (choice.get("message") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content") if self.logprobs else None
        return _result_from(raw, _letter_top_list(content) if content else None)


def _letter_top_list(content: list[dict]) -> list[tuple[str, float]] | None:
    """Top log-probs at the verdict letter of a chat answer: the first token that is a bare A/B and follows
    "Response" (or starts the answer)."""
    before = ""
    for tok in content:
        t = tok.get("token", "")
        if t.strip() in ("A", "B") and (not before.strip() or re.search(r"response\W*$", before, re.IGNORECASE)):
            tops = tok.get("top_logprobs") or []
            listed = [(x.get("token", ""), x.get("logprob")) for x in tops]
            if not any(k == t for k, _ in listed):
                listed.append((t, tok.get("logprob")))
            return [(k, float(v)) for k, v in listed if v is not None]
        before += t
    return None


def _result_from(raw: str, top_list: list[tuple[str, float]] | None) -> OrderResult:
    """An :class:`OrderResult` from a judge's text and (optionally) the top log-probs at the letter."""
    if top_list:
        groups: dict[str, list[float]] = {"A": [], "B": []}
        for tok, lp in top_list:
            key = tok.strip()
            if key in groups:
                groups[key].append(lp)
        if groups["A"] or groups["B"]:
            floor = min(lp for _, lp in top_list)
            vals = {k: (_logsumexp(v) if v else floor) for k, v in groups.items()}
            bounded = [k for k, v in groups.items() if not v]
            choice: Letter = "A" if vals["A"] >= vals["B"] else "B"
            extra = {"bounded": bounded} if bounded else {}
            return OrderResult(choice, vals["A"], vals["B"], raw=raw, extra=extra)
    letter = parse_verdict(raw)
    if letter is None:
        return OrderResult(None, raw=raw, error=f"unparseable judge output: {raw[:120]!r}")
    return OrderResult(letter, raw=raw)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


# --------------------------------------------------------------------------- pairs and the run loop
@dataclass
class Pair:
    """Two systems' responses to one instruction; ``index`` is the row in the A file."""

    index: int
    instruction: str
    output_a: str
    output_b: str
    dataset: str | None = None
    generator_a: str | None = None
    generator_b: str | None = None


def load_pairs(a_path: str | Path, b_path: str | Path) -> tuple[list[Pair], list[str]]:
    """Pair two AlpacaEval-format outputs files by instruction (in A's order).

    Returns ``(pairs, warnings)``; rows of A without a match in B are skipped with a warning. Raises
    naming the file and line when a row lacks a string ``instruction`` or ``output``.
    """
    rows_a, rows_b = _outputs_rows(a_path), _outputs_rows(b_path)
    by_instr: dict[str, list[dict]] = {}
    for row in rows_b:
        by_instr.setdefault(row["instruction"], []).append(row)
    pairs, unmatched = [], 0
    for i, ra in enumerate(rows_a):
        cands = by_instr.get(ra["instruction"])
        if not cands:
            unmatched += 1
            continue
        rb = cands.pop(0)
        pairs.append(Pair(i, ra["instruction"], ra["output"], rb["output"], ra.get("dataset"),
                          ra.get("generator"), rb.get("generator")))
    warnings = []
    if unmatched:
        warnings.append(f"{unmatched} instruction(s) of {a_path} have no output in {b_path}; skipped")
    extra_b = sum(len(v) for v in by_instr.values())
    if extra_b:
        warnings.append(f"{extra_b} row(s) of {b_path} have no match in {a_path}; ignored")
    if not pairs:
        raise ValueError(f"{a_path} and {b_path} share no instruction; judge outputs of the same prompts")
    return pairs, warnings


def _outputs_rows(path: str | Path) -> list[dict]:
    from cmerl.io import read_records

    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}: line {bad[0].line}: {bad[0].reason}")
    out = []
    for line, row in rows:
        if not isinstance(row, dict) or row.get("kind") == VERDICTS_KIND:
            raise ValueError(f"{path}: row {line} is not an outputs object with instruction/output")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}: row {line} has no string {key!r} (AlpacaEval model_outputs format "
                                 f"needs 'instruction' and 'output')")
        out.append(row)
    return out


def verdicts_header(judge: Judge, rule: DecisionRule, prompt: JudgePrompt, *, a: dict, b: dict) -> dict:
    """First line of a verdicts file: who judged, how, with which prompt, and what was compared.

    ``a`` / ``b`` describe the two systems (``path``, ``generator``); when ``path`` is a file its content
    hash is added as ``sha256``. ``fingerprint`` (:mod:`cmerl.fingerprint`) holds those hashes and the
    judge, decision rule and prompt: :func:`run_judge` refuses to resume a file whose fingerprint differs."""
    from cmerl.fingerprint import Fingerprint, sha256_file

    a, b = dict(a), dict(b)
    for side in (a, b):
        path = side.get("path")
        if isinstance(path, str) and Path(path).is_file():
            side["sha256"] = sha256_file(path)
    header = {"kind": VERDICTS_KIND, "version": 1, "judge": {"name": judge.name, "settings": judge.settings()},
              "decision": asdict(rule), "prompt": prompt.to_dict(), "a": a, "b": b}
    header["fingerprint"] = Fingerprint(
        "judge", inputs={"a": a.get("sha256"), "b": b.get("sha256")},
        settings={"judge": header["judge"], "decision": header["decision"],
                  "prompt_sha256": prompt.sha256}).to_dict()
    return header


def pair_sha256(pair: Pair) -> str:
    """Content hash of what a verdict row judged (instruction and both outputs), kept in every row so a
    resume never keeps a verdict on other outputs."""
    from cmerl.fingerprint import sha256_json

    return sha256_json([pair.instruction, pair.output_a, pair.output_b])


def read_verdicts(path: str | Path) -> tuple[dict | None, list[dict]]:
    """``(header, rows)`` of a verdicts file (complete lines only); raises when it is not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"verdicts file not found: {path}")
    header, rows = None, []
    for i, obj in enumerate(iter_jsonl(path)):
        if i == 0 and obj.get("kind") == VERDICTS_KIND:
            header = obj
        elif "verdict" in obj and "index" in obj:
            rows.append(obj)
        else:
            raise ValueError(f"{path}: line {i + 1} is not a verdict row (needs 'index' and 'verdict')")
    return header, rows


def _same_setup(old: dict, new: dict) -> list[str]:
    if "fingerprint" in new:
        from cmerl.fingerprint import Fingerprint

        if "fingerprint" not in old:
            return ["fingerprint (the file was written by an older cmerl that did not record its inputs)"]
        diffs = Fingerprint.from_dict(new["fingerprint"]).differences(
            Fingerprint.from_dict(old["fingerprint"], where="the verdicts header's fingerprint"))
        what = {"input 'a'": "A outputs", "input 'b'": "B outputs", "setting 'judge": "judge",
                "setting 'decision": "decision", "setting 'prompt": "prompt"}
        return [next((name for start, name in what.items() if d.startswith(start)), "setup") + f" ({d})"
                for d in diffs]
    diffs = []
    for key in ("judge", "decision"):
        if old.get(key) != new.get(key):
            diffs.append(key)
    if (old.get("prompt") or {}).get("sha256") != new["prompt"]["sha256"]:
        diffs.append("prompt")
    return diffs


def run_judge(judge: Judge, pairs: Sequence[Pair], output: str | Path, *, rule: DecisionRule = DecisionRule(),
              header: dict, chunk_pairs: int = 4, progress: bool = False,
              stop_after: int | None = None) -> list[dict]:
    """Judge every pair in both orders and append one row per pair to ``output`` (JSONL), resumably.

    An existing file must carry the same fingerprint (:func:`verdicts_header`: judge, settings, decision
    rule, prompt and the content hashes of the A and B files), else
    :class:`~cmerl.fingerprint.RunMismatchError` (a ValueError) naming what differs; pairs already in it
    (same index and instruction, judged on the same outputs: ``pair_sha256``) are kept, not redone. Rows are appended
    and fsynced every ``chunk_pairs`` pairs, so an interrupted run loses at most one chunk. An order whose
    output is unusable is retried once. ``stop_after`` judges at most that many new pairs (for tests and
    budgets). Returns all rows of the file, in pair order.
    """
    out = Path(output)
    old_header, old_rows = read_verdicts(out) if out.exists() else (None, [])
    if out.exists() and out.stat().st_size > 0:
        if old_header is None:
            raise ValueError(f"{out} exists but is not a cmerl verdicts file; pass another --output")
        diffs = _same_setup(old_header, header)
        if diffs:
            raise RunMismatchError(f"{out} was judged with a different {'; '.join(diffs)}; pass another --output "
                                   "(or delete the file) to judge with these settings")
    else:
        append_jsonl(out, [header])
    current = {(p.index, p.instruction): pair_sha256(p) for p in pairs}
    for r in old_rows:
        key = (r["index"], r.get("instruction"))
        if key in current and r.get("pair_sha256") != current[key]:
            raise RunMismatchError(f"{out}: the verdict on pair {r['index']} ({str(r.get('instruction'))[:60]!r}) "
                                   "was judged on other outputs than this run's: it belongs to another run; pass "
                                   "another --output (or delete the file)")
    done = {(r["index"], r.get("instruction")) for r in old_rows}
    todo = [p for p in pairs if (p.index, p.instruction) not in done]
    if stop_after is not None:
        todo = todo[:max(0, stop_after)]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * len(todo), desc=f"judging ({judge.name})", unit="call")
        judge.progress = bar.update  # type: ignore[attr-defined]
    try:
        new_rows = []
        for s in range(0, len(todo), chunk_pairs):
            chunk = todo[s:s + chunk_pairs]
            rows = judge_pairs(judge, chunk, rule)
            append_jsonl(out, rows)
            new_rows.extend(rows)
    finally:
        if bar is not None:
            bar.close()
            judge.progress = None  # type: ignore[attr-defined]
    by_key = {(r["index"], r.get("instruction")): r for r in old_rows + new_rows}
    order = {(p.index, p.instruction): k for k, p in enumerate(pairs)}
    return sorted(by_key.values(), key=lambda r: order.get((r["index"], r.get("instruction")), 1 << 30))


def judge_pairs(judge: Judge, pairs: Sequence[Pair], rule: DecisionRule = DecisionRule()) -> list[dict]:
    """Verdict rows for pairs (both orders, one retry of unusable orders); nothing is written."""
    jobs = []
    for p in pairs:
        jobs.append(Job(p.instruction, p.output_a, p.output_b))  # order ab
        jobs.append(Job(p.instruction, p.output_b, p.output_a))  # order ba
    results = judge.judge(jobs)
    retry = [k for k, r in enumerate(results) if r.choice is None]
    if retry:
        again = judge.judge([jobs[k] for k in retry])
        for k, r in zip(retry, again):
            r.attempts = 2
            if r.choice is None:
                r.error = r.error or "unparseable judge output"
                r.extra["first_raw"] = results[k].raw
            results[k] = r
    rows = []
    for n, p in enumerate(pairs):
        ab, ba = results[2 * n], results[2 * n + 1]
        verdict, margin, consistent = decide(ab, ba, rule)
        rows.append({"index": p.index, "instruction": p.instruction, "pair_sha256": pair_sha256(p),
                     "dataset": p.dataset,
                     "generator_a": p.generator_a, "generator_b": p.generator_b,
                     "len_a": len(p.output_a), "len_b": len(p.output_b),
                     "verdict": verdict, "margin": margin, "consistent": consistent,
                     "orders": {"ab": ab.to_dict(), "ba": ba.to_dict()}})
    return rows


def judge_key(header: dict) -> str:
    """A short key for a judge setup (name, settings, decision rule, prompt), to look up its agreement.

    The weights' dtype is left out: ``auto`` picks bf16 or fp32 by hardware, which moves log-probs by
    rounding only, and a measured agreement belongs to the model, prompt and rule."""
    judge = dict(header["judge"])
    judge["settings"] = {k: v for k, v in (judge.get("settings") or {}).items() if k != "dtype"}
    blob = json.dumps([judge, header.get("decision"), header["prompt"]["sha256"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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

    def build(self) -> LocalJudge | OpenAIJudge:
        prompt = JudgePrompt.load(self.prompt_path)
        if self.base_url:
            return OpenAIJudge(self.base_url, self.name, api=self.api, api_key_env=self.api_key_env,
                               logprobs=self.logprobs, top_logprobs=self.top_logprobs, prompt=prompt,
                               max_response_chars=self.max_response_chars, concurrency=self.concurrency,
                               template_tokenizer=self.template_tokenizer)
        return LocalJudge.from_pretrained(self.name, dtype=self.dtype, prompt=prompt,
                                          max_response_chars=self.max_response_chars,
                                          max_batch_tokens=self.max_batch_tokens)
