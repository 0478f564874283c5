"""How much to trust the judge and the reward.

* :func:`judge_check`: agreement of a judge with GPT-4 Turbo's AlpacaEval annotations (bundled sample of
  gpt4_1106_preview vs gemma-2b-it pairs, or any annotations file of that shape), with a length-only
  baseline so a reader sees how much of the agreement "the longer answer wins" would get. The result is
  remembered per judge setup (:mod:`cmerl.agreement_registry`) so every later win-rate report can state
  the judge's agreement.
* :func:`reward_check`: on (prompt, chosen, rejected) pairs, how often each verifier signal prefers the
  chosen response, next to a length-only baseline, and the signals' correlation with length;
  :func:`ensemble_check` for the mean of several verifiers.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from cmerl.agreement_registry import update_registry
from cmerl.formatting import completion_text
from cmerl.io import read_records
from cmerl.judging import DecisionRule, Judge, JudgePrompt, Pair, judge_key, run_judge, verdicts_header
from cmerl.metrics import Rate, format_pct, format_signed, pearson, preference_scores, rate, spearman
from cmerl.reward_variants import NULL_PROMPT, length_residuals, pmi_values
from cmerl.scoring import SIGNALS

JUDGE_CHECK_FILE = "judge_check_alpaca_eval_80.jsonl"
PREFERENCE_FILE = "ultrafeedback_1000.jsonl"


def _rows_of(path: str | Path | None, bundled: str) -> tuple[list[tuple[int, object]], str]:
    """``([(line, row)], source name)`` of a records file, or of the bundled file ``bundled`` when ``path``
    is None; a malformed line raises ValueError naming it."""
    if path is None:
        text = resources.files("cmerl").joinpath("data", bundled).read_text(encoding="utf-8")
        rows = [(i + 1, json.loads(line)) for i, line in enumerate(text.splitlines()) if line.strip()]
        return rows, f"cmerl/data/{bundled}"
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}: line {bad[0].line}: {bad[0].reason}")
    return rows, str(path)


# --------------------------------------------------------------------------- judge-check
@dataclass
class ReferencePair:
    """A pair with a reference judgement: ``reference`` is "a" (output_1 better), "b" or "tie"."""

    pair: Pair
    reference: str
    preference: float


def load_reference_pairs(path: str | Path | None = None, n: int | None = None) -> list[ReferencePair]:
    """Pairs with GPT-4 Turbo preferences: the bundled sample, or an AlpacaEval ``annotations.json``
    (rows with ``instruction``, ``output_1``, ``output_2``, ``preference`` in [1, 2], 1 = output_1 wins).
    Rows without a numeric preference are skipped. ``n`` keeps the first n."""
    rows, source = _rows_of(path, JUDGE_CHECK_FILE)
    out = []
    for line, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{source}: row {line} is not an object")
        missing = [k for k in ("instruction", "output_1", "output_2", "preference") if k not in r]
        if missing:
            raise ValueError(f"{source}: row {line} lacks {missing} (expected AlpacaEval annotations)")
        pref = r["preference"]
        if not isinstance(pref, (int, float)):
            continue
        ref = "a" if pref < 1.5 else "b" if pref > 1.5 else "tie"
        pair = Pair(int(r.get("id", line - 1)), r["instruction"], r["output_1"] or "", r["output_2"] or "",
                    r.get("dataset"), r.get("generator_1"), r.get("generator_2"))
        out.append(ReferencePair(pair, ref, float(pref)))
        if n is not None and len(out) >= n:
            break
    if not out:
        raise ValueError(f"{source}: no usable annotated pairs")
    return out


def agreement_scores(verdicts: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per pair: 1 when the verdict matches the reference, 0.5 when exactly one is a tie, 0 when they pick
    opposite systems. Error verdicts must be removed first."""
    out = []
    for v, r in zip(verdicts, references):
        if v == "error":
            raise ValueError("remove error verdicts before computing agreement")
        out.append(1.0 if v == r else 0.5 if "tie" in (v, r) else 0.0)
    return out


def length_verdict(len_a: int, len_b: int) -> str:
    """The length-only judge: the longer response wins; equal lengths tie."""
    return "a" if len_a > len_b else "b" if len_b > len_a else "tie"


@dataclass
class JudgeCheckResult:
    """Agreement of a judge with the reference annotations on ``n`` pairs (errors excluded, counted).

    agreement: ties count half; decisive: among pairs where the judge did not tie; consistency: fraction
    whose two orders agreed; length_baseline: agreement of "the longer response wins" on the same pairs.
    """

    judge: str
    key: str
    n: int
    errors: int
    ties: int
    agreement: Rate
    decisive_agreement: Rate
    consistency: Rate
    length_baseline: Rate
    reference_b_wins: int
    data: str
    verdicts: str
    settings: dict = field(default_factory=dict)
    measured: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        a = self.agreement
        return (f"judge {self.judge}: agreement with GPT-4 Turbo {format_pct(a.value)} (95% CI {format_pct(a.ci_low)}-"
                f"{format_pct(a.ci_high)}, n={self.n}, {self.ties} ties, {self.errors} errors); position consistency "
                f"{format_pct(self.consistency.value)}; length-only baseline {format_pct(self.length_baseline.value)}")


def judge_check(judge: Judge, *, output: str | Path, n: int = 40, data: str | Path | None = None,
                rule: DecisionRule = DecisionRule(), prompt: JudgePrompt | None = None, seed: int = 0,
                progress: bool = False, remember: bool = True) -> JudgeCheckResult:
    """Judge ``n`` reference pairs (resumably, into ``output``) and compare with the reference verdicts."""
    refs = load_reference_pairs(data, n)
    prompt = prompt or getattr(judge, "prompt", None) or JudgePrompt.load()
    source = str(data) if data else f"cmerl/data/{JUDGE_CHECK_FILE}"
    header = verdicts_header(judge, rule, prompt,
                             a={"path": source, "generator": refs[0].pair.generator_a or "output_1"},
                             b={"path": source, "generator": refs[0].pair.generator_b or "output_2"})
    rows = run_judge(judge, [r.pair for r in refs], output, rule=rule, header=header, progress=progress)
    by_key = {(r["index"], r["instruction"]): r for r in rows}
    kept = [(ref, by_key[(ref.pair.index, ref.pair.instruction)]) for ref in refs
            if (ref.pair.index, ref.pair.instruction) in by_key]
    judged = [(ref, row) for ref, row in kept if row["verdict"] != "error"]
    verdicts = [row["verdict"] for _, row in judged]
    references = [ref.reference for ref, _ in judged]
    decisive = [(v, r) for v, r in zip(verdicts, references) if v != "tie"]
    length = [length_verdict(len(ref.pair.output_a), len(ref.pair.output_b)) for ref, _ in judged]
    result = JudgeCheckResult(
        judge=judge.name, key=judge_key(header), n=len(judged), errors=len(kept) - len(judged),
        ties=verdicts.count("tie"),
        agreement=rate(agreement_scores(verdicts, references), seed=seed),
        decisive_agreement=rate(agreement_scores([v for v, _ in decisive], [r for _, r in decisive]), seed=seed),
        consistency=rate([1.0 if row["consistent"] else 0.0 for _, row in judged], seed=seed),
        length_baseline=rate(agreement_scores(length, references), seed=seed),
        reference_b_wins=references.count("b"), data=source, verdicts=str(output),
        settings={"judge": header["judge"]["settings"], "decision": header["decision"],
                  "prompt_sha256": prompt.sha256},
        measured=time.strftime("%Y-%m-%d"))
    if remember:
        remember_agreement(result)
    return result


def remember_agreement(result: JudgeCheckResult) -> None:
    """Store a judge-check summary under its judge key, for later reports."""
    update_registry(result.key, lambda entry: entry.update(_agreement_summary(result)))  # keeps "pairs" results


def _agreement_summary(result: JudgeCheckResult) -> dict:
    return {"judge": result.judge, "agreement": result.agreement.value, "ci_low": result.agreement.ci_low,
            "ci_high": result.agreement.ci_high, "n": result.n, "consistency": result.consistency.value,
            "length_baseline": result.length_baseline.value, "measured": result.measured,
            "source": "cmerl judge-check"}


# --------------------------------------------------------------------------- reward-check
@dataclass
class PreferencePair:
    prompt: str | list
    chosen: str
    rejected: str


def load_preference_pairs(path: str | Path | None = None, n: int | None = None) -> list[PreferencePair]:
    """(prompt, chosen, rejected) rows: the bundled UltraFeedback sample or any JSON/JSONL file with those
    string fields (TRL's conversational ``[{"role", "content"}]`` form is accepted for all three)."""
    rows, source = _rows_of(path, PREFERENCE_FILE)
    out = []
    for line, r in rows:
        if not isinstance(r, dict) or any(k not in r for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{source}: row {line} needs 'prompt', 'chosen' and 'rejected' fields")
        try:
            chosen, rejected = completion_text(r["chosen"]), completion_text(r["rejected"])
        except TypeError as exc:
            raise ValueError(f"{source}: row {line}: {exc}") from None
        out.append(PreferencePair(r["prompt"], chosen, rejected))
        if n is not None and len(out) >= n:
            break
    if not out:
        raise ValueError(f"{source}: no preference pairs")
    return out


#: What ``rejected`` means in a reward check: the data's own rejected answers, or another prompt's answer.
REJECTED_MODES = ("data", "off-topic")


def off_topic_pairs(pairs: Sequence[PreferencePair], *, seed: int = 0) -> list[PreferencePair]:
    """Each prompt's ``chosen`` answer against the ``chosen`` answer of a different prompt (a random
    derangement, fixed by ``seed``): does the reward depend on the prompt at all? Needs two pairs or more."""
    if len(pairs) < 2:
        raise ValueError(f"an off-topic check needs at least 2 pairs (got {len(pairs)})")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    other = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}  # a cycle: never itself
    return [PreferencePair(p.prompt, p.chosen, pairs[other[i]].chosen) for i, p in enumerate(pairs)]


@dataclass
class SignalCheck:
    """One signal: how often it prefers chosen, and its correlation with response length (tokens)."""

    accuracy: Rate
    pearson_length: float | None
    spearman_length: float | None


@dataclass
class RewardCheckResult:
    verifier: str
    n: int
    signals: dict[str, SignalCheck]
    length_baseline: Rate
    mean_tokens_chosen: float
    mean_tokens_rejected: float
    truncated: int
    seconds: float
    data: str
    rejected: str = "data"  # one of REJECTED_MODES
    #: per signal, its value on each chosen response then each rejected one (2n floats), for ensembles
    values: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RewardCheckResult:
        """Inverse of :meth:`to_dict` (a ``reward_check.json``). Only ``verifier``, ``n``, ``signals`` and
        ``length_baseline`` are required; raises KeyError/TypeError on another kind of file."""
        signals = {k: SignalCheck(Rate(**s["accuracy"]), s.get("pearson_length"), s.get("spearman_length"))
                   for k, s in d["signals"].items()}
        defaults = {"mean_tokens_chosen": float("nan"), "mean_tokens_rejected": float("nan"), "truncated": 0,
                    "seconds": float("nan"), "data": ""}
        return cls(**{**defaults, **d, "signals": signals, "length_baseline": Rate(**d["length_baseline"])})

    def table(self) -> str:
        """A markdown table of the result."""
        against = "an off-topic answer" if self.rejected == "off-topic" else "rejected"
        header = f"| signal | prefers chosen over {against} | 95% CI | Pearson r with length | Spearman ρ with length |"
        lines = [header, "|---|---|---|---|---|"]
        for name, s in self.signals.items():
            lines.append(f"| {name} | {format_pct(s.accuracy.value)} | {format_pct(s.accuracy.ci_low)}-{format_pct(s.accuracy.ci_high)}"
                         f" | {format_signed(s.pearson_length)} | {format_signed(s.spearman_length)} |")
        b = self.length_baseline
        lines.append(f"| length only (longer wins) | {format_pct(b.value)} | {format_pct(b.ci_low)}-{format_pct(b.ci_high)} | 1 | 1 |")
        return "\n".join(lines)


def check_signal_names(signals: Sequence[str]) -> list[str]:
    """Validate reward-check signal names: the verifier signals (mean_logprob, sum_logprob, neg_entropy), the
    variants ``cme_pmi:<lambda>`` (lambda in [0, 1]) and ``cme_length_resid`` (:mod:`cmerl.reward_variants`)."""
    names = [s.strip() for s in signals if s.strip()]
    if not names:
        raise ValueError("no signal given")
    for s in names:
        if s in SIGNALS or s == "cme_length_resid":
            continue
        lam = s.removeprefix("cme_pmi:") if s.startswith("cme_pmi:") else None
        try:
            ok = lam is not None and 0.0 <= float(lam) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"unknown signal {s!r}; use some of {', '.join(SIGNALS)}, cme_pmi:<lambda in [0, 1]>, "
                             "cme_length_resid")
    return names


def _signal_check(values: Sequence[float], lengths: Sequence[int], n: int, seed: int) -> SignalCheck:
    return SignalCheck(rate(preference_scores(values[:n], values[n:]), seed=seed), pearson(values, lengths),
                       spearman(values, lengths))


def reward_check(verifier, pairs: Sequence[PreferencePair], *, signals: Sequence[str] = ("mean_logprob",
                 "sum_logprob", "neg_entropy"), seed: int = 0, progress: bool = False,
                 data: str = "", rejected: str = "data") -> RewardCheckResult:
    """Score chosen and rejected responses with a verifier (a :class:`~cmerl.scoring.Verifier` or anything
    with its ``score``) and summarise each signal; the length baseline prefers the longer text (chars).

    Signals (:func:`check_signal_names`): the verifier's own, ``cme_pmi:<lambda>`` (one more scoring pass,
    after the content-free instruction, shared by every lambda) and ``cme_length_resid`` (mean_logprob
    residualised on log token length over all 2n responses: a pair has too few points for a per-prompt fit).
    ``rejected="off-topic"`` replaces each rejected answer by another prompt's chosen answer
    (:func:`off_topic_pairs`): a verifier that conditions on the prompt prefers the on-topic answer."""
    signals = check_signal_names(signals)
    if rejected not in REJECTED_MODES:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED_MODES)} (got {rejected!r})")
    if rejected == "off-topic":
        pairs = off_topic_pairs(pairs, seed=seed)
    t0 = time.perf_counter()
    prompts = [p.prompt for p in pairs]
    scores = verifier.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                            entropy="neg_entropy" in signals, progress=progress)
    n = len(pairs)
    chosen_scores, rejected_scores = scores[:n], scores[n:]
    lengths = [s.n_tokens for s in scores]
    nulls = None
    if any(s.startswith("cme_pmi:") for s in signals):
        nulls = verifier.score([NULL_PROMPT] * (2 * n), [p.chosen for p in pairs] + [p.rejected for p in pairs],
                               progress=progress)
    out, per_item = {}, {}
    for name in signals:
        if name.startswith("cme_pmi:"):
            values = pmi_values(scores, nulls, lam=float(name.split(":", 1)[1]))
        elif name == "cme_length_resid":
            values = length_residuals([s.mean_logprob for s in scores], lengths)
        else:
            values = [s.signal(name) for s in scores]
        per_item[name] = values
        out[name] = _signal_check(values, lengths, n, seed)
    length = rate(preference_scores([len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs]), seed=seed)
    return RewardCheckResult(
        verifier=str(getattr(verifier, "name", verifier)), n=n, signals=out, length_baseline=length,
        mean_tokens_chosen=sum(s.n_tokens for s in chosen_scores) / n,
        mean_tokens_rejected=sum(s.n_tokens for s in rejected_scores) / n,
        truncated=sum(s.truncated for s in scores), seconds=time.perf_counter() - t0, data=data, rejected=rejected,
        values=per_item)


def ensemble_check(results: Sequence[RewardCheckResult], signal: str = "mean_logprob", *,
                   seed: int = 0) -> SignalCheck:
    """The reward check of the mean of ``signal`` over several verifiers' results on the same pairs (what
    a ``cme`` reward with several ``verifiers`` computes). Length correlations are left out (None): the
    members count tokens with different tokenizers."""
    if len(results) < 2:
        raise ValueError("an ensemble needs at least two reward-check results")
    if len({(r.n, r.data, r.rejected) for r in results}) != 1:
        raise ValueError("ensemble members must be checks of the same pairs (same n, data and rejected mode)")
    missing = [r.verifier for r in results if signal not in r.values]
    if missing:
        raise ValueError(f"results of {missing} hold no per-pair values of {signal!r}")
    n = results[0].n
    mean = [sum(r.values[signal][i] for r in results) / len(results) for i in range(2 * n)]
    return SignalCheck(rate(preference_scores(mean[:n], mean[n:]), seed=seed), None, None)
