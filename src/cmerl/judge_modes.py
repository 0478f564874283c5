"""Other ways to judge than the plain pairwise prompt: reference-guided, rubric-scored pointwise, ensemble.

All three implement the :class:`cmerl.judging.Judge` protocol, so ``run_judge``, the decision rule, the
verdicts file and every report work unchanged.

* **reference** (MT-Bench's reference-guided judging): the pairwise prompt also shows a reference answer
  to the same instruction (by default the bundled AlpacaEval 2.0 GPT-4 Turbo answers,
  ``data/alpaca_eval_gpt4_1106_preview.json``). :class:`ReferencePrompt` is a :class:`JudgePrompt` with a
  ``{reference}`` placeholder; its sha256 covers the references, so verdicts made with other references
  are never mixed or credited with this setup's agreement.
* **pointwise**: :class:`PointwiseJudge` scores each answer once on a 1-9 rubric
  (``prompts/pointwise_rubric.txt``): the expected score under the judge's next-token distribution over
  the digit tokens after "Score:". A pair costs two forward passes instead of the pairwise mode's two
  passes over both answers; both orders of a pair reuse the two scores. An order's log-odds for
  Response A are ``score_A - score_B`` (score points), so a pair's summed margin is ``2 (score_a - score_b)``
  and the tie threshold applies to it.
* **ensemble**: :class:`EnsembleJudge` asks several judges and averages their log-odds per order
  (:func:`combine_orders`); a member that fails an order makes the ensemble's order an error, never a vote.
  :class:`ReplayJudge` answers from a verdicts file already written, so an ensemble of judges that were
  each run before can be measured without running them again (same settings, same judge key).

Judge names on the command line (:func:`build_judge`): a model name (local), ``openai:MODEL@URL``,
``anthropic:MODEL[@URL]``, or ``ensemble:NAME+NAME+...``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from cmerl.formatting import render_context
from cmerl.io import read_records
from cmerl.judging import (
    DEFAULT_MAX_RESPONSE_CHARS,
    Job,
    JudgePrompt,
    JudgeSpec,
    LocalJudge,
    OrderResult,
    Pair,
    read_prompt_sections,
    read_verdicts,
    truncate_response,
)
from cmerl.scoring.requests import plan_batches

MODES = ("pairwise", "reference", "pointwise")
#: The mode used when none is given: the one that agreed best with GPT-4 Turbo on the system-vs-system
#: pairs (benchmarks/RESULTS.md, "Judge options").
DEFAULT_MODE = "pairwise"
REFERENCE_PROMPT = "pairwise_judge_reference.txt"
RUBRIC_PROMPT = "pointwise_rubric.txt"
REFERENCE_OUTPUTS = "alpaca_eval_gpt4_1106_preview.json"
SCORE_DIGITS = tuple(str(d) for d in range(1, 10))


# --------------------------------------------------------------------------- reference-guided
def load_references(path: str | Path | None = None) -> tuple[dict[str, str], str, str]:
    """``(instruction -> reference answer, source, sha256)`` from an AlpacaEval outputs file (default: the
    bundled GPT-4 Turbo answers to the 805 AlpacaEval instructions). Raises ValueError naming a bad row."""
    if path is None:
        res = resources.files("cmerl").joinpath("data", REFERENCE_OUTPUTS)
        path, source = Path(str(res)), f"cmerl/data/{REFERENCE_OUTPUTS}"
    else:
        source = str(path)
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{source}: line {bad[0].line}: {bad[0].reason}")
    refs: dict[str, str] = {}
    for line, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ValueError(f"{source}: row {line} needs string 'instruction' and 'output' (AlpacaEval outputs)")
        refs.setdefault(r["instruction"], r["output"])
    return refs, source, hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ReferencePrompt(JudgePrompt):
    """A pairwise prompt whose user section also holds ``{reference}``: the reference answer to the same
    instruction, looked up by exact instruction text (cut at ``max_reference_chars``)."""

    references: dict = field(default_factory=dict, compare=False, repr=False)
    references_source: str = ""
    references_sha256: str = ""
    max_reference_chars: int = DEFAULT_MAX_RESPONSE_CHARS

    @classmethod
    def build(cls, prompt_path: str | Path | None = None, references: str | Path | None = None) -> ReferencePrompt:
        """The packaged reference prompt (or ``prompt_path``, which must contain ``{reference}``) with the
        references of :func:`load_references`."""
        if prompt_path is None:
            res = resources.files("cmerl").joinpath("prompts", REFERENCE_PROMPT)
            base = JudgePrompt.load(Path(str(res)))
            base = replace(base, source=f"cmerl/prompts/{REFERENCE_PROMPT}")
        else:
            base = JudgePrompt.load(prompt_path)
        if "{reference}" not in base.user:
            raise ValueError(f"judge prompt {base.source}: reference mode needs a {{reference}} placeholder in "
                             "the user section")
        refs, source, sha = load_references(references)
        return cls(base.system, base.user, base.prefill, base.text, base.source, refs, source, sha)

    @property
    def sha256(self) -> str:
        blob = f"{self.text}\0references:{self.references_sha256}\0max:{self.max_reference_chars}"
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def reference_for(self, instruction: str) -> str:
        ref = self.references.get(instruction)
        if ref is None:
            raise ValueError(f"no reference answer for the instruction {instruction[:80]!r} in "
                             f"{self.references_source}; reference-guided judging needs one for every instruction "
                             "(pass --references FILE, an AlpacaEval outputs file, or use --judge-mode pairwise)")
        return truncate_response(ref, self.max_reference_chars)

    def user_message(self, instruction: str, response_a: str, response_b: str) -> str:
        values = {"instruction": instruction, "response_a": response_a, "response_b": response_b,
                  "reference": self.reference_for(instruction)}
        return re.sub(r"\{(instruction|response_a|response_b|reference)\}", lambda m: values[m.group(1)], self.user)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "references": {"source": self.references_source,
                                                    "sha256": self.references_sha256,
                                                    "max_chars": self.max_reference_chars}}


# --------------------------------------------------------------------------- pointwise rubric
@dataclass(frozen=True)
class RubricPrompt:
    """A pointwise prompt: system text, a user template with ``{instruction}`` and ``{response}``, and the
    assistant prefill ("Score:") after which the judge's next token is the score digit."""

    system: str
    user: str
    prefill: str
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, path: str | Path | None = None) -> RubricPrompt:
        """Load a rubric prompt file (default: the packaged ``prompts/pointwise_rubric.txt``); same section
        markers as :meth:`JudgePrompt.load`, and the user section must hold ``{instruction}`` and ``{response}``."""
        text, source, sections = read_prompt_sections(path, RUBRIC_PROMPT, "rubric prompt")
        user = sections["user"].strip("\n")
        for ph in ("{instruction}", "{response}"):
            if ph not in user:
                raise ValueError(f"rubric prompt {source}: the user section must contain {ph}")
        return cls(sections["system"].strip("\n"), user, sections["assistant_prefill"].strip("\n").rstrip(), text,
                   source)

    def messages(self, instruction: str, response: str) -> list[dict]:
        values = {"instruction": instruction, "response": response}
        user = re.sub(r"\{(instruction|response)\}", lambda m: values[m.group(1)], self.user)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "text": self.text}


def score_odds(score_a: float, score_b: float) -> OrderResult:
    """An order's result from two scores: log-odds ``d = score_A - score_B`` as the normalised two-way
    log-probs ``(-softplus(-d), -softplus(d))``, so ``logprob_A - logprob_B = d`` exactly."""
    d = score_a - score_b
    la, lb = -_softplus(-d), -_softplus(d)
    return OrderResult("A" if la >= lb else "B", la, lb, raw=f"{score_a:.3f} vs {score_b:.3f}",
                       extra={"score_A": score_a, "score_B": score_b})


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class PointwiseJudge(LocalJudge):
    """A local causal LM scoring each answer once on a 1-9 rubric (see module docstring).

    ``score``: the expected digit under the judge's distribution renormalised over the nine digit tokens
    (float, 1-9); ``digit_mass`` in the cache records how much probability the digits had. Scores are
    cached per (instruction, cut response) for the judge's lifetime.
    """

    def __init__(self, model, tokenizer, *, prompt: RubricPrompt | None = None, **kwargs):
        super().__init__(model, tokenizer, prompt=None, **kwargs)
        self.prompt = prompt or RubricPrompt.load()  # type: ignore[assignment]
        self._scores: dict[tuple[str, str], tuple[float, float]] = {}
        self._digit_ids: tuple[int, ...] | None = None
        self._space: str | None = None

    @classmethod
    def from_pretrained(cls, name: str, *, dtype: str = "auto", **kwargs) -> PointwiseJudge:
        # deferred: torch, via cmerl.models (slow import, loaded only when used)
        from cmerl.models import load_model

        model, tok = load_model(name, dtype=dtype, role="judge")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, tok, name=name, dtype=dtype, **kwargs)

    def settings(self) -> dict:
        return {**super().settings(), "mode": "pointwise", "scale": [1, 9], "choices": list(SCORE_DIGITS)}

    def encode_response(self, instruction: str, response: str) -> tuple[list[int], tuple[int, ...]]:
        """``(context ids, the nine digit ids)``: the context ends just before the score digit. Raises when
        the tokenizer does not encode each digit as one token after the prefill."""
        msgs = self.prompt.messages(instruction, truncate_response(response, self.max_response_chars))
        context = render_context(self.tokenizer, msgs, self.render_config) + self.prompt.prefill
        for space in (" ", ""):
            encoded = [self._encode(context + space + d) for d in SCORE_DIGITS]
            p = min(len(e) for e in encoded) - 1
            if all(len(e) == p + 1 for e in encoded) and all(e[:p] == encoded[0][:p] for e in encoded):
                return encoded[0][:p], tuple(e[p] for e in encoded)
        raise ValueError(f"judge tokenizer of {self.name!r} does not encode the digits 1-9 as one token each "
                         f"after the prefill {self.prompt.prefill!r}")

    def score(self, items: Sequence[tuple[str, str]]) -> list[tuple[float, float]]:
        """``(expected score, digit mass)`` per (instruction, response), each distinct answer scored once."""

        keys = [(i, truncate_response(r, self.max_response_chars)) for i, r in items]
        todo = list(dict.fromkeys(k for k in keys if k not in self._scores))
        encoded = [self.encode_response(i, r) for i, r in todo]
        digits = torch.arange(1, 10, dtype=torch.float32)
        for batch in plan_batches([len(e[0]) for e in encoded], self.max_batch_tokens):
            logp = self.next_token_logprobs([encoded[i][0] for i in batch])
            for row, i in enumerate(batch):
                lp = logp[row, list(encoded[i][1])]
                p = torch.softmax(lp, dim=-1)
                self._scores[todo[i]] = (float((p * digits).sum()), float(torch.exp(lp).sum()))
        return [self._scores[k] for k in keys]

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        flat = [(j.instruction, r) for j in jobs for r in (j.response_A, j.response_B)]
        scores = self.score(flat)
        out = []
        for k in range(len(jobs)):
            (sa, ma), (sb, mb) = scores[2 * k], scores[2 * k + 1]
            if math.isnan(sa) or math.isnan(sb):
                out.append(OrderResult(None, error="judge returned NaN scores"))
                continue
            r = score_odds(sa, sb)
            r.extra.update(digit_mass_A=ma, digit_mass_B=mb)
            out.append(r)
        if self.progress:
            self.progress(len(jobs))
        return out


# --------------------------------------------------------------------------- ensemble
def combine_orders(results: Sequence[OrderResult], names: Sequence[str] = ()) -> OrderResult:
    """One order's ensemble result: the mean over members of their log-odds for Response A (a member in
    parse mode counts +1 for A, -1 for B), as normalised two-way log-probs. Any member's error or missing
    choice makes the ensemble's order an error naming that member."""
    ds = []
    for k, r in enumerate(results):
        if r.error or r.choice is None:
            who = names[k] if k < len(names) else f"member {k}"
            return OrderResult(None, raw=r.raw, error=f"ensemble member {who}: {r.error or 'no verdict'}")
        ds.append(r.logprob_A - r.logprob_B if r.has_logprobs else (1.0 if r.choice == "A" else -1.0))  # type: ignore[operator]
    d = sum(ds) / len(ds)
    la, lb = -_softplus(-d), -_softplus(d)
    return OrderResult("A" if la >= lb else "B", la, lb, raw=f"mean log-odds {d:+.3f}", extra={"members": ds})


class EnsembleJudge:
    """Several judges as one (see :func:`combine_orders`); ``settings`` records each member's name,
    settings and prompt sha256."""

    def __init__(self, members: Sequence, *, name: str | None = None):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 judges (got {len(members)})")
        self.members = list(members)
        self.name = name or "ensemble:" + "+".join(m.name for m in self.members)
        self.prompt = self.members[0].prompt
        self.progress: Callable[[int], None] | None = None

    def settings(self) -> dict:
        return {"kind": "ensemble", "mode": "mean-log-odds",
                "members": [{"name": m.name, "settings": _without_dtype(m.settings()),
                             "prompt_sha256": m.prompt.sha256} for m in self.members]}

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        per_member = [m.judge(jobs) for m in self.members]
        names = [m.name for m in self.members]
        out = [combine_orders([res[k] for res in per_member], names) for k in range(len(jobs))]
        if self.progress:
            self.progress(len(jobs))
        return out

    def close(self) -> None:
        for m in self.members:
            if hasattr(m, "close"):
                m.close()


def _without_dtype(settings: dict) -> dict:
    """Member settings without the weights' dtype (as :func:`cmerl.judging.judge_key` ignores it)."""
    return {k: v for k, v in settings.items() if k != "dtype"}


class _StoredPrompt:
    """A prompt known only by its recorded text and sha256 (from a verdicts header)."""

    def __init__(self, d: dict):
        self._d = d
        self.sha256 = d["sha256"]
        self.text = d.get("text", "")

    def to_dict(self) -> dict:
        return dict(self._d)


class ReplayJudge:
    """Answers jobs from a verdicts file written before (by its judge, on ``pairs``): the stored order
    results, looked up by (instruction, Response A, Response B). A job it has no answer for is an error.
    Its name, settings and prompt are the recorded ones, so it keys like the judge that wrote the file."""

    def __init__(self, verdicts: str | Path, pairs: Sequence[Pair]):
        header, rows = read_verdicts(verdicts)
        if header is None:
            raise ValueError(f"{verdicts} has no cmerl verdicts header")
        self.name = header["judge"]["name"]
        self._settings = header["judge"]["settings"]
        self.prompt = _StoredPrompt(header["prompt"])
        by_index = {(p.index, p.instruction): p for p in pairs}
        self._answers: dict[tuple[str, str, str], OrderResult] = {}
        for r in rows:
            p = by_index.get((r["index"], r["instruction"]))
            if p is None:
                continue
            for order, (ra, rb) in (("ab", (p.output_a, p.output_b)), ("ba", (p.output_b, p.output_a))):
                o = dict(r["orders"][order])
                o.setdefault("extra", {})
                self._answers[(p.instruction, ra, rb)] = OrderResult(**o)
        self.source = str(verdicts)
        self.progress: Callable[[int], None] | None = None

    def settings(self) -> dict:
        return self._settings

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        out = []
        for j in jobs:
            r = self._answers.get((j.instruction, j.response_A, j.response_B))
            out.append(r if r is not None else OrderResult(None, error=f"no stored verdict in {self.source}"))
        if self.progress:
            self.progress(len(jobs))
        return out


# --------------------------------------------------------------------------- judges from names
def parse_judge_name(name: str) -> tuple[str, str, str | None]:
    """``(kind, model, url)`` of a judge name: ``local`` (a model name), ``openai:MODEL@URL``,
    ``anthropic:MODEL[@URL]``, ``ensemble:A+B+...`` (model = the member list). Raises on a bad name."""
    if name.startswith("ensemble:"):
        members = [m for m in name.removeprefix("ensemble:").split("+") if m]
        if len(members) < 2:
            raise ValueError(f"judge {name!r}: an ensemble needs two or more members, e.g. ensemble:A+B")
        return "ensemble", "+".join(members), None
    for kind in ("openai", "anthropic"):
        if name.startswith(kind + ":"):
            model, _, url = name.removeprefix(kind + ":").partition("@")
            if not model:
                raise ValueError(f"judge {name!r}: give the model name, e.g. {kind}:MODEL@URL")
            if kind == "openai" and not url:
                raise ValueError(f"judge {name!r}: an OpenAI-compatible judge needs its URL, openai:MODEL@URL")
            return kind, model, url or None
    if not name:
        raise ValueError("empty judge name")
    return "local", name, None


def build_judge(name: str, spec: JudgeSpec, *, mode: str = DEFAULT_MODE, references: str | Path | None = None,
                anthropic_version: str | None = None):
    """A judge from a name (see :func:`parse_judge_name`) with the flags in ``spec`` (dtype, prompt file,
    endpoint options; ``spec.base_url`` makes a plain name an OpenAI-compatible endpoint model) and a mode
    (:data:`MODES`). Loads local models."""
    if mode not in MODES:
        raise ValueError(f"judge mode must be one of {', '.join(MODES)} (got {mode!r})")
    kind, model, url = parse_judge_name(name)
    if kind == "ensemble":
        members = [build_judge(m, spec, mode=mode, references=references) for m in model.split("+")]
        return EnsembleJudge(members, name=name)
    if kind == "local" and spec.base_url:
        kind, url = "openai", spec.base_url
    if mode == "pointwise":
        if kind != "local":
            raise ValueError(f"judge {name!r}: pointwise mode needs a local judge (it reads the score digits' "
                             "log-probs); use --judge-mode pairwise or reference for endpoints")
        return PointwiseJudge.from_pretrained(model, dtype=spec.dtype, max_response_chars=spec.max_response_chars,
                                              max_batch_tokens=spec.max_batch_tokens,
                                              prompt=RubricPrompt.load(spec.prompt_path))
    prompt = (ReferencePrompt.build(spec.prompt_path, references) if mode == "reference"
              else JudgePrompt.load(spec.prompt_path))
    if kind == "anthropic":
        # deferred: torch, via cmerl.anthropic_judge (slow import, loaded only when used)
        from cmerl.anthropic_judge import AnthropicJudge

        return AnthropicJudge(model, base_url=url, api_key_env=spec.api_key_env or "ANTHROPIC_API_KEY",
                              prompt=prompt, max_response_chars=spec.max_response_chars,
                              concurrency=spec.concurrency)
    judge = replace(spec, name=model, base_url=url if kind == "openai" else None, prompt_path=None).build()
    judge.prompt = prompt  # the judges read self.prompt at judging time
    return judge

