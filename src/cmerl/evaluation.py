"""How much to trust the judge and the reward, and the one-command trained-vs-base evaluation.

* :func:`judge_check`: agreement of a judge with GPT-4 Turbo's AlpacaEval annotations (bundled sample of
  gpt4_1106_preview vs gemma-2b-it pairs, or any annotations file of that shape), with a length-only
  baseline so a reader sees how much of the agreement "the longer answer wins" would get.
* :func:`reward_check`: on (prompt, chosen, rejected) pairs, how often each verifier signal prefers the
  chosen response, next to a length-only baseline, and the signals' correlation with length.
* :func:`run_eval`: generate with the trained and the base model, judge both orders, win rate, report.

Measured agreements are remembered per judge setup (``$CMERL_CACHE/judge_checks.json``) so every later
win-rate report can state the judge's agreement.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from cmerl.generation import GenerationConfig
from cmerl.io import read_records, write_json_atomic
from cmerl.judging import (
    DecisionRule,
    Judge,
    JudgePrompt,
    JudgeSpec,
    Pair,
    judge_key,
    read_verdicts,
    run_judge,
    verdicts_header,
)
from cmerl.metrics import (
    Rate,
    WinRate,
    format_pct,
    format_signed,
    pearson,
    preference_scores,
    rate,
    spearman,
    win_rate,
)

JUDGE_CHECK_FILE = "judge_check_alpaca_eval_80.jsonl"
PREFERENCE_FILE = "ultrafeedback_1000.jsonl"

#: Agreement of the packaged judges with GPT-4 Turbo, measured with the default prompt, settings and
#: decision rule by ``cmerl judge-check`` (see benchmarks/RESULTS.md, "Evaluation"). Keyed by
#: :func:`cmerl.judging.judge_key`, so a judge run with other settings does not inherit the number.
PACKAGED_AGREEMENT: dict[str, dict] = {
    key: {"judge": judge, "agreement": agr, "ci_low": lo, "ci_high": hi, "n": 80, "consistency": cons,
          "length_baseline": 0.725, "measured": "2026-11-24", "source": "packaged judge-check, benchmarks/RESULTS.md"}
    for key, judge, agr, lo, hi, cons in [
        ("47167bee90e4f6d6", "qwen2.5-coder-1.5b-instruct", 0.66875, 0.575, 0.7625, 0.6125),
        ("2c0361a3e91f886d", "qwen2.5-coder-0.5b-instruct", 0.53125, 0.45, 0.60625, 0.05),
        ("9831ada898a259e8", "smollm2-135m-instruct", 0.5375, 0.475, 0.6, 0.05),
        ("d2c59df7f6b547b5", "gemma-3-270m", 0.48125, 0.4125, 0.55, 0.0),
    ]
}


# --------------------------------------------------------------------------- judge-check
@dataclass
class ReferencePair:
    """A pair with a reference judgement: ``reference`` is "a" (output_1 better), "b" or "tie"."""

    pair: Pair
    reference: str
    preference: float


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


def _registry_path() -> Path:
    from cmerl.models import cache_dir

    return cache_dir() / "judge_checks.json"


def remember_agreement(result: JudgeCheckResult) -> None:
    """Store a judge-check summary under its judge key, for later reports."""
    path = _registry_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[result.key] = {**data.get(result.key, {}), **_agreement_summary(result)}  # keeps "pairs" results
    write_json_atomic(path, data)


def _agreement_summary(result: JudgeCheckResult) -> dict:
    return {"judge": result.judge, "agreement": result.agreement.value, "ci_low": result.agreement.ci_low,
            "ci_high": result.agreement.ci_high, "n": result.n, "consistency": result.consistency.value,
            "length_baseline": result.length_baseline.value, "measured": result.measured,
            "source": "cmerl judge-check"}


def lookup_agreement(header: dict | None) -> dict | None:
    """The measured agreement of the judge setup in a verdicts header: from this machine's judge-checks,
    else from :data:`PACKAGED_AGREEMENT`; ``None`` when never measured."""
    if not header:
        return None
    key = judge_key(header)
    path = _registry_path()
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    packaged, local = PACKAGED_AGREEMENT.get(key) or {}, data.get(key) or {}
    if not packaged and not local:
        return None
    if "agreement" in local:  # this machine's easy-pair check replaces the packaged one; pairs merge by file
        merged = {**local, "pairs": {**packaged.get("pairs", {}), **local.get("pairs", {})}}
    else:
        merged = {**packaged, "pairs": {**packaged.get("pairs", {}), **local.get("pairs", {})}}
    return merged


# --------------------------------------------------------------------------- reward-check
@dataclass
class PreferencePair:
    prompt: str | list
    chosen: str
    rejected: str


def load_preference_pairs(path: str | Path | None = None, n: int | None = None) -> list[PreferencePair]:
    """(prompt, chosen, rejected) rows: the bundled UltraFeedback sample or any JSON/JSONL file with those
    string fields (TRL's conversational ``[{"role", "content"}]`` form is accepted for all three)."""
    from cmerl.formatting import completion_text

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
    from cmerl.scoring import SIGNALS

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
    from cmerl.reward_variants import NULL_PROMPT, length_residuals, pmi_values

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


# --------------------------------------------------------------------------- one-command evaluation
@dataclass
class EvalPlan:
    """``cmerl eval``: generate with ``trained`` and ``base`` on ``prompts``, judge trained (A) against base
    (B) with ``judge``, and write everything under ``output_dir``."""

    trained: str
    base: str
    judge: JudgeSpec
    prompts: str
    output_dir: Path
    generation: GenerationConfig
    rule: DecisionRule = field(default_factory=DecisionRule)
    seed: int = 0


def generator_label(name: str) -> str:
    """A short generator name for a model name or folder (the folder's name)."""
    p = Path(name).expanduser()
    return p.resolve().name if p.is_dir() else name


def ensure_outputs(name: str, items, output: Path, config, *, generator: str | None = None,
                   progress: bool = False) -> list[dict]:
    """Generate ``output`` for ``items`` with model ``name`` unless it is already complete (resumable)."""
    import gc

    from cmerl.generation import generate_outputs, generator_fingerprint, load_generator, outputs_complete

    label = generator or generator_label(name)
    what = generator_fingerprint(name)  # what the weights are: a resume with other weights is refused
    if outputs_complete(output, items, generator=label, config=config, model_fingerprint=what):
        rows, _ = read_records(output)
        return [r for _, r in rows]
    model, tok = load_generator(name, dtype=config.dtype)
    try:
        return generate_outputs(model, tok, items, output, generator=label, config=config, progress=progress,
                                model_fingerprint=what)
    finally:
        del model
        gc.collect()


def find_metrics(run_dir: str | Path) -> Path | None:
    """``metrics.jsonl`` of a training run folder (itself or one level down), if any."""
    p = Path(run_dir).expanduser()
    if not p.is_dir():
        return None
    for cand in [p / "metrics.jsonl", *sorted(p.glob("*/metrics.jsonl"))]:
        if cand.is_file():
            return cand
    return None


def training_system_prompt(run_dir: str | Path) -> str | None:
    """The ``system_prompt`` of a training run's ``cmerl_config.yaml``, if there is one."""
    cfg = Path(run_dir).expanduser() / "cmerl_config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    try:
        value = (yaml.safe_load(cfg.read_text()) or {}).get("system_prompt")
    except (yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def run_eval(plan: EvalPlan, *, progress: bool = True, log=print) -> WinRateSummary:
    """Run the whole evaluation (each step resumable) and return the win-rate summary."""
    import gc

    from cmerl.generation import load_prompt_items
    from cmerl.judging import load_pairs
    from cmerl.report import write_report

    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_prompt_items(plan.prompts)
    trained_prompt = training_system_prompt(plan.trained)
    if trained_prompt and trained_prompt != plan.generation.system_prompt:
        log(f"note: {plan.trained} was trained with the system prompt {trained_prompt!r}; both models are "
            f"evaluated with {plan.generation.system_prompt!r} (pass --system-prompt to change that)")
    paths = {"trained": out / "outputs_trained.json", "base": out / "outputs_base.json"}
    for role, name in (("trained", plan.trained), ("base", plan.base)):
        log(f"[1/3] generating {len(items)} outputs with the {role} model {name} -> {paths[role]}")
        ensure_outputs(name, items, paths[role], plan.generation, progress=progress)
    log(f"[2/3] judging with {plan.judge.name} (both orders) -> {out / 'verdicts.jsonl'}")
    judge = plan.judge.build()
    try:
        pairs, warnings = load_pairs(paths["trained"], paths["base"])
        for w in warnings:
            log(f"warning: {w}")
        header = verdicts_header(judge, plan.rule, judge.prompt,
                                 a={"path": str(paths["trained"]), "generator": generator_label(plan.trained)},
                                 b={"path": str(paths["base"]), "generator": generator_label(plan.base)})
        run_judge(judge, pairs, out / "verdicts.jsonl", rule=plan.rule, header=header, progress=progress)
    finally:
        if hasattr(judge, "close"):
            judge.close()
        del judge
        gc.collect()
    summary = summarize_verdicts(out / "verdicts.jsonl", seed=plan.seed)
    write_json_atomic(out / "winrate.json", summary.to_dict())
    log("[3/3] writing the report")
    write_report(out, metrics=find_metrics(plan.trained))
    return summary


# --------------------------------------------------------------------------- win rate of a verdicts file
@dataclass
class WinRateSummary:
    """A verdicts file summarised: the win rate of A over B, who judged, and how far to trust the judge."""

    winrate: WinRate
    judge: str
    judge_settings: dict
    decision: dict
    agreement: dict | None
    a: dict
    b: dict
    verdicts: str
    length_controlled: dict | None = None  # cmerl.length_control.LengthControlled.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """A few readable lines (what ``cmerl winrate`` prints)."""
        w = self.winrate
        name_a = self.a.get("generator") or self.a.get("path") or "A"
        name_b = self.b.get("generator") or self.b.get("path") or "B"
        lines = [f"A = {name_a}   vs   B = {name_b}   ({self.verdicts})",
                 f"judged pairs n={w.n}: wins {w.wins} / ties {w.ties} / losses {w.losses}; errors excluded: {w.errors}"]
        if w.n:
            lines.append(f"win rate of A (ties count half): {format_pct(w.win_rate)}  "
                         f"[{int(w.level * 100)}% bootstrap CI {format_pct(w.ci_low)}-{format_pct(w.ci_high)}]")
            lines.append(f"win rate without ties: {format_pct(w.win_rate_no_ties)}; "
                         f"position consistency of the judge: {format_pct(w.consistency)}")
            lines.append(f"mean length (chars): A {_num0(w.mean_len_a)}, B {_num0(w.mean_len_b)}")
            lines.append(length_controlled_text(self.length_controlled))
        lines.append(f"judge: {self.judge} ({self.judge_settings.get('kind', '?')}, "
                     f"{self.judge_settings.get('mode', '?')}); {agreement_text(self.agreement, self.judge)}")
        return "\n".join(lines)


def length_controlled_text(lc: dict | None) -> str:
    """One line with the length-controlled win rate beside the raw one (or why there is none)."""
    if not lc:
        return "length-controlled win rate: not computed"
    if lc.get("win_rate") is None:
        return f"length-controlled win rate: n/a ({lc.get('note', '')})"
    return (f"length-controlled win rate of A: {format_pct(lc['win_rate'])}  [{format_pct(lc.get('ci_low'))}-"
            f"{format_pct(lc.get('ci_high'))}, bootstrap {lc.get('n_boot')}]; raw {format_pct(lc.get('raw'))}; "
            f"length coefficient {lc.get('length_coef'):+.2f} (positive: the judge favoured longer answers)")


def agreement_text(agreement: dict | None, judge: str) -> str:
    """One phrase stating a judge's measured agreement with GPT-4 Turbo, or that it is unknown."""
    from cmerl.calibration import pairs_text

    if not agreement or agreement.get("agreement") is None:
        easy = (f"agreement with GPT-4 Turbo not measured for this judge setup (run: cmerl judge-check "
                f"--judge {judge})")
    else:
        easy = (f"agreement with GPT-4 Turbo {format_pct(agreement.get('agreement'))} (95% CI "
                f"{format_pct(agreement.get('ci_low'))}-{format_pct(agreement.get('ci_high'))}, n={agreement.get('n')}, "
                f"{agreement.get('source', 'judge-check')}, {agreement.get('measured', '')}; length-only baseline "
                f"{format_pct(agreement.get('length_baseline'))})")
    return f"{easy}; {pairs_text(agreement)}"


def summarize_verdicts(path: str | Path, *, n_boot: int = 10_000, seed: int = 0) -> WinRateSummary:
    """Win rate of a verdicts file (see :func:`cmerl.metrics.win_rate`) with the judge and its agreement."""
    header, rows = read_verdicts(path)
    if header is None:
        raise ValueError(f"{path} has no cmerl verdicts header (first line); was it written by cmerl judge?")
    wr = win_rate([r["verdict"] for r in rows], consistent=[r.get("consistent") for r in rows],
                  len_a=[r.get("len_a") for r in rows], len_b=[r.get("len_b") for r in rows],
                  n_boot=n_boot, seed=seed)
    from cmerl.length_control import length_controlled_win_rate

    lc = length_controlled_win_rate([r["verdict"] for r in rows], [r.get("len_a") for r in rows],
                                    [r.get("len_b") for r in rows], seed=seed)
    return WinRateSummary(wr, header["judge"]["name"], header["judge"]["settings"], header.get("decision", {}),
                          lookup_agreement(header), header.get("a", {}), header.get("b", {}), str(path),
                          length_controlled=lc.to_dict())


def _num0(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


