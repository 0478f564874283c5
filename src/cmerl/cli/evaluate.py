"""Evaluation commands: ``generate``, ``judge``, ``winrate``, ``judge-check``, ``reward-check``, ``report``,
``eval``. Each is a thin call into :mod:`cmerl.generation`, :mod:`cmerl.judging`, :mod:`cmerl.checks`,
:mod:`cmerl.winrates`, :mod:`cmerl.evaluation` and :mod:`cmerl.report`."""

from __future__ import annotations

import gc
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console

from cmerl.cli.app import app, dtype_option, either_spelling, input_errors, old_spelling
from cmerl.io import name_slug, skipped_lines, write_json_atomic

# Judge options shared by judge, judge-check and eval.
JUDGE = typer.Option(..., "--judge", "-j", help="Judge model: a cmerl model name (packaged alias, HF folder, "
                     ".gguf), or with --judge-url the model name on that endpoint.")
JUDGE_URL = typer.Option(None, "--judge-url", help="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
JUDGE_API = typer.Option("chat", "--judge-api", help="Endpoint API: chat or completions.")
API_KEY_ENV = typer.Option(None, "--api-key-env", help="Name of the environment variable holding the API key.")
LOGPROBS = typer.Option(True, "--logprobs/--no-logprobs", help="Endpoint judges: ask for log-probs (verdict from "
                        "the choice-token probabilities) or parse the text verdict only.")
TEMPLATE_FROM = typer.Option(None, "--template-from", help="Completions API: render the prompt with this "
                             "model's chat template (a cmerl model name).")
JUDGE_DTYPE = dtype_option("Local judge weights", "--judge-dtype")
MAX_CHARS = typer.Option(3000, "--max-response-chars", help="Responses longer than this are cut (marked) "
                         "before judging; 0 keeps them whole.")
THRESHOLD = typer.Option(0.2, "--threshold", help="Log-prob judges: a pair whose margin summed over both "
                         "orders is below this (nats) is a tie.")
CONSISTENT = typer.Option(False, "--require-consistent", help="Also call a pair a tie when the two orders "
                          "prefer different responses.")
PROMPT_FILE = typer.Option(None, "--prompt-file", help="Judge prompt file (default: the packaged one).")
PREFIX_REUSE = typer.Option(False, "--prefix-reuse/--no-prefix-reuse", help="Local pairwise/reference judges: run "
                            "the prompt prefix all pairs share once and reuse its KV cache (1.37x measured, same "
                            "verdicts up to float rounding; benchmarks/RESULTS.md). Endpoint judges ignore it.")
CONCURRENCY = typer.Option(4, "--concurrency", help="Endpoint judges: parallel requests.")
JUDGES = typer.Option(..., "--judge", "-j", help="Judge (repeat for several: each gets its own verdicts file, "
                      "win rate and agreement, and their mean is printed): a cmerl model name, openai:MODEL@URL, "
                      "anthropic:MODEL[@URL] (Messages API, key from --api-key-env, default ANTHROPIC_API_KEY), or "
                      "ensemble:NAME+NAME (log-odds averaged); with --judge-url a plain name is that endpoint's model.")
JUDGE_MODE = typer.Option(None, "--judge-mode", help="pairwise (both answers in one prompt), reference (also shows "
                          "a reference answer: the bundled GPT-4 Turbo AlpacaEval answers, or --references) or "
                          "pointwise (local judges: each answer scored 1-9 once). Default: the measured best, "
                          "see docs/evaluation.md.")
REFERENCES = typer.Option(None, "--references", help="Reference-guided mode: an AlpacaEval outputs file whose "
                          "answers are shown as references (default: the bundled gpt4_1106_preview answers).")


def _judge_spec(judge, judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype, max_chars,
                prompt_file, concurrency, prefix_reuse):
    from cmerl.judging import JudgeSpec  # deferred: torch, via cmerl.judging (torch-free CLI start)

    if judge_api not in ("chat", "completions"):
        raise typer.BadParameter(f"--judge-api must be chat or completions (got {judge_api!r})")
    return JudgeSpec(judge, base_url=judge_url, api=judge_api, api_key_env=api_key_env, logprobs=logprobs,
                     template_tokenizer=template_from, dtype=judge_dtype, max_response_chars=max_chars,
                     prompt_path=str(prompt_file) if prompt_file else None, concurrency=concurrency,
                     prefix_reuse=prefix_reuse)


def _judge_builders(names, spec, mode, references):
    """``[(name, build)]`` for :func:`cmerl.judge_panel.run_panel`; checks the names before loading anything."""
    # deferred: torch, via cmerl.judge_modes (torch-free CLI start)
    from cmerl.judge_modes import DEFAULT_MODE, MODES, build_judge, parse_judge_name

    mode = mode or DEFAULT_MODE
    if mode not in MODES:
        raise typer.BadParameter(f"--judge-mode must be one of {', '.join(MODES)} (got {mode!r})")
    for n in names:
        parse_judge_name(n)
    return [(n, lambda n=n: build_judge(n, spec, mode=mode, references=references)) for n in names]


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input or setup: reported as one ``error:`` line, exit code 1."""
    # deferred: torch, via cmerl.judging (torch-free CLI start)
    from cmerl.judging import JudgeConnectionError

    return input_errors(ValueError, JudgeConnectionError)


def _console():
    return Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    _console().print(f"[red]error:[/red] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(1)


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help="Model name or folder (packaged alias, HF folder, "
                              ".gguf, training output folder)."),
    prompts: str = typer.Option("alpaca_eval", "--prompts", "-p", help="alpaca_eval[:N], ultrafeedback[:N], or a "
                                ".jsonl/.json file with instruction or prompt fields (slice with [a:b] or :N)."),
    output: Path = typer.Option(..., "--output", "-o", help="AlpacaEval-format outputs JSON to write (resumable)."),
    max_new_tokens: int = typer.Option(512, help="Most tokens generated per prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default); > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling (only when sampling)."),
    seed: int = typer.Option(0, help="Sampling seed (each batch: seed + index of its first prompt)."),
    batch_size: int = typer.Option(8, help="Prompts per batch (left-padded)."),
    dtype: str = dtype_option("Weights (while generating)"),
    system_prompt: str = typer.Option(None, help="System turn for chat templates (default: none)."),
    generator: str = typer.Option(None, help="Name written in the 'generator' field (default: the model name)."),
) -> None:
    """Generate outputs for a prompt set, AlpacaEval model_outputs.json format; rerun to resume."""
    # deferred: torch, via cmerl.evaluation and cmerl.generation (torch-free CLI start)
    from cmerl.evaluation import ensure_outputs
    from cmerl.generation import GenerationConfig, load_prompt_items

    try:
        items = load_prompt_items(prompts)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  batch_size=batch_size, dtype=dtype, system_prompt=system_prompt)
        rows = ensure_outputs(model, items, output, config, generator=generator, progress=True)
    except _user_errors() as exc:
        _fail(str(exc))
    cut = sum(1 for r in rows if r.get("finish_reason") == "length")
    _console().print(f"{len(rows)} outputs in {output} ({cut} stopped at max_new_tokens={max_new_tokens})")


@app.command()
def judge(
    a: Path = typer.Option(..., "--a", help="Outputs file of system A (e.g. the trained model)."),
    b: Path = typer.Option(..., "--b", help="Outputs file of system B (e.g. the base model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Verdicts JSONL to write (resumable)."),
    judge: list[str] = JUDGES, judge_url: str = JUDGE_URL, judge_api: str = JUDGE_API,
    api_key_env: str = API_KEY_ENV, logprobs: bool = LOGPROBS, template_from: str = TEMPLATE_FROM,
    judge_dtype: str = JUDGE_DTYPE, max_response_chars: int = MAX_CHARS, threshold: float = THRESHOLD,
    require_consistent: bool = CONSISTENT, prompt_file: Path = PROMPT_FILE, concurrency: int = CONCURRENCY,
    prefix_reuse: bool = PREFIX_REUSE,
    judge_mode: str = JUDGE_MODE, references: Path = REFERENCES,
    limit: int = typer.Option(None, "--limit", help="Judge at most this many new pairs in this run."),
) -> None:
    """Judge A against B on the instructions they share, each pair in both orders; prints the win rate (and
    the length-controlled one). Several --judge: one verdicts file each (OUTPUT.<judge>.jsonl), per-judge
    numbers and their mean (OUTPUT.panel.json); a judge that fails is reported and left out of the mean."""
    # deferred: torch, via cmerl.judge_panel and cmerl.judging and cmerl.winrates (torch-free CLI start)
    from cmerl.judge_panel import PANEL_SUFFIX, run_panel
    from cmerl.judging import DecisionRule, load_pairs
    from cmerl.winrates import summarize_verdicts

    console = _console()
    try:
        pairs, warnings = load_pairs(a, b)
        rule = DecisionRule(threshold, require_consistent)
        spec = _judge_spec(judge[0], judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype,
                           max_response_chars, prompt_file, concurrency, prefix_reuse)
        builders = _judge_builders(judge, spec, judge_mode, references)
        for w in warnings:
            console.print(f"[yellow]warning: {w}[/yellow]")
        panel = run_panel(builders, pairs, output, rule=rule, progress=True, stop_after=limit,
                          a={"path": str(a), "generator": pairs[0].generator_a},
                          b={"path": str(b), "generator": pairs[0].generator_b})
    except _user_errors() as exc:
        _fail(str(exc))
    if len(judge) == 1:
        if panel.members[0].error:
            _fail(panel.members[0].error)
        print(summarize_verdicts(output).text())
        return
    write_json_atomic(output.with_name(output.name.removesuffix(".jsonl") + PANEL_SUFFIX), panel.to_dict())
    print(panel.text())
    if panel.failed:
        _fail(f"{len(panel.failed)} of {len(judge)} judges failed: {', '.join(m.name for m in panel.failed)}")


@app.command()
def winrate(
    verdicts: Path = typer.Argument(..., help="Verdicts JSONL written by cmerl judge / eval."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the summary as JSON here."),
    json_out: Path = old_spelling("--json", "--output"),
    n_boot: int = typer.Option(10_000, help="Bootstrap resamples."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Wins / ties / losses, tie-adjusted win rate with a bootstrap CI, consistency and lengths."""
    # deferred: torch, via cmerl.winrates (torch-free CLI start)
    from cmerl.winrates import summarize_verdicts

    try:
        summary = summarize_verdicts(verdicts, n_boot=n_boot, seed=seed)
    except _user_errors() as exc:
        _fail(str(exc))
    skipped = skipped_lines(verdicts)  # corrupt lines are left out of the win rate: say so
    if skipped:
        shown = "; ".join(f"line {b.line}: {b.reason}" for b in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        _console().print(f"[yellow]warning: {len(skipped)} line(s) of {verdicts} skipped, not counted: "
                         f"{shown}{more}[/yellow]", highlight=False)
    output = either_spelling(output, json_out, new_flag="--output", old_flag="--json")
    if output:
        write_json_atomic(output, summary.to_dict())
    print(summary.text())


@app.command("judge-check")
def judge_check(
    judge: str = JUDGE, judge_url: str = JUDGE_URL, judge_api: str = JUDGE_API, api_key_env: str = API_KEY_ENV,
    logprobs: bool = LOGPROBS, template_from: str = TEMPLATE_FROM, judge_dtype: str = JUDGE_DTYPE,
    max_response_chars: int = MAX_CHARS, threshold: float = THRESHOLD, require_consistent: bool = CONSISTENT,
    prompt_file: Path = PROMPT_FILE, concurrency: int = CONCURRENCY, prefix_reuse: bool = PREFIX_REUSE,
    judge_mode: str = JUDGE_MODE, references: Path = REFERENCES,
    limit: int = typer.Option(None, "--limit", help="Pairs to judge, the first N (default: 40 of the bundled "
                              "sample's 80; with --pairs, every selected pair)."),
    input: Path = typer.Option(None, "--input", "-i", help="AlpacaEval annotations JSON (instruction, output_1, "
                               "output_2, preference) instead of the bundled sample."),
    n: int = old_spelling("--n", "--limit"),
    data: Path = old_spelling("--data", "--input"),
    pairs: str = typer.Option(None, "--pairs", help="System-vs-system pairs instead: a model-pairs JSONL, or the "
                              "bundled phi2 (phi-2-sft vs phi-2) or fusechat (FuseChat-Llama-3.2-1B vs gemma-2b-it)."),
    min_margin: float = typer.Option(0.3, "--min-margin", help="With --pairs: only prompts where GPT-4 Turbo's "
                                     "preference margin between the two systems is at least this (0-1)."),
    max_pair_chars: int = typer.Option(None, "--max-pair-chars", help="With --pairs: only pairs whose instruction "
                                       "+ both outputs have at most this many characters (cheaper on a CPU)."),
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Where verdicts.jsonl and judge_check.json go "
                                    "(default: judge_check/<judge>, or judge_check/<judge>/<pairs> with --pairs)."),
) -> None:
    """Agreement of a judge with GPT-4 Turbo: on its AlpacaEval verdicts (gpt4_1106_preview vs gemma-2b-it,
    an easy gap) or, with --pairs, on two similar systems GPT-4 Turbo rated apart by --min-margin."""
    # deferred: torch, via cmerl.checks and cmerl.judging (torch-free CLI start)
    from cmerl.checks import judge_check as run_check
    from cmerl.judging import DecisionRule

    n = either_spelling(limit, n, new_flag="--limit", old_flag="--n")
    data = either_spelling(input, data, new_flag="--input", old_flag="--data")
    if pairs and data:
        _fail("pass --input (annotations) or --pairs (system-vs-system pairs), not both")
    out = output_dir or Path("judge_check") / name_slug(judge, 200) / (name_slug(pairs, 200) if pairs else "")
    try:
        spec = _judge_spec(judge, judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype,
                           max_response_chars, prompt_file, concurrency, prefix_reuse)
        rule = DecisionRule(threshold, require_consistent)
        j = _judge_builders([judge], spec, judge_mode, references)[0][1]()
        if pairs:
            # deferred: torch, via cmerl.calibration (torch-free CLI start)
            from cmerl.calibration import pairs_check

            result = pairs_check(j, pairs, output=out / "verdicts.jsonl", min_margin=min_margin, n=n,
                                 max_pair_chars=max_pair_chars, rule=rule, progress=True)
        else:
            result = run_check(j, output=out / "verdicts.jsonl", n=40 if n is None else n, data=data,
                               rule=rule, progress=True)
    except _user_errors() as exc:
        _fail(str(exc))
    write_json_atomic(out / "judge_check.json", result.to_dict())
    print(result.summary())
    if pairs:
        print(f"GPT-4 Turbo preferred {result.generator_a} (A) in {result.reference_a} of {result.n} pairs; "
              f"wrote {out / 'judge_check.json'}")
    else:
        print(f"reference (GPT-4 Turbo) preferred output_2 in {result.reference_b_wins} of {result.n} pairs; "
              f"wrote {out / 'judge_check.json'}")


@app.command("reward-check")
def reward_check(
    verifier: list[str] = typer.Option(..., "--verifier", "-v", help="Verifier model name; repeat it to also "
                                       "check the ensemble (mean mean_logprob) of several."),
    input: Path = typer.Option(None, "--input", "-i", help="JSONL/JSON with prompt, chosen, rejected (default: "
                               "the bundled UltraFeedback pairs)."),
    limit: int = typer.Option(200, "--limit", help="Pairs to check (the first N)."),
    rejected: str = typer.Option("data", "--rejected", help="What chosen is compared with: 'data' (the pairs' "
                                 "rejected answers) or 'off-topic' (another prompt's chosen answer: does the "
                                 "reward depend on the prompt?)."),
    signals: str = typer.Option("mean_logprob,sum_logprob,neg_entropy", help="Comma-separated signals: "
                                "mean_logprob, sum_logprob, neg_entropy, cme_pmi:<lambda> (e.g. cme_pmi:1), "
                                "cme_length_resid."),
    dtype: str = dtype_option("Verifier weights"),
    batch_tokens: int = typer.Option(4096, help="Token budget of one scoring batch."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the result as JSON here."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    data: Path = old_spelling("--data", "--input"),
    n: int = old_spelling("--n", "--limit"),
) -> None:
    """How often each verifier signal prefers the chosen response, vs a length-only baseline. With several
    --verifier, each is checked in turn (one loaded at a time), then their ensemble; --output then holds
    {"results": [...], "ensemble": {...}}."""
    # deferred: torch, via cmerl.checks and cmerl.scoring.Verifier (torch-free CLI start); numpy, via cmerl.metrics (slow import, fast CLI start)
    from cmerl.checks import REJECTED_MODES, check_signal_names, ensemble_check, load_preference_pairs
    from cmerl.checks import reward_check as run_check
    from cmerl.metrics import format_pct
    from cmerl.scoring import Verifier

    data = either_spelling(input, data, new_flag="--input", old_flag="--data")
    n = either_spelling(limit, n, new_flag="--limit", old_flag="--n", default=200)
    try:
        names = check_signal_names(signals.split(","))
    except ValueError as exc:
        _fail(str(exc))
    if rejected not in REJECTED_MODES:
        _fail(f"--rejected must be one of {', '.join(REJECTED_MODES)} (got {rejected!r})")
    if len(verifier) > 1 and "mean_logprob" not in names:
        names.insert(0, "mean_logprob")  # what the ensemble averages
    results = []
    for name in verifier:
        try:
            pairs = load_preference_pairs(data, n)
            v = Verifier.from_pretrained(name, dtype=dtype, max_batch_tokens=batch_tokens)
            result = run_check(v, pairs, signals=names, seed=seed, progress=True, rejected=rejected,
                               data=str(data) if data else "cmerl/data/ultrafeedback_1000.jsonl")
        except _user_errors() as exc:
            _fail(str(exc))
        del v
        gc.collect()
        results.append(result)
        kind = "preference pairs" if rejected == "data" else "prompts, each answer against another prompt's"
        print(f"verifier {name} on {result.n} {kind} ({result.data}); {result.seconds:.0f}s")
        print(result.table())
        print(f"mean tokens: chosen {result.mean_tokens_chosen:.0f}, rejected {result.mean_tokens_rejected:.0f}; "
              f"truncated responses: {result.truncated}")
    ensemble = None
    if len(results) > 1:
        ensemble = ensemble_check(results, seed=seed)
        a = ensemble.accuracy
        print(f"ensemble of {', '.join(verifier)} (mean mean_logprob) prefers chosen in {format_pct(a.value)} "
              f"(95% CI {format_pct(a.ci_low)}-{format_pct(a.ci_high)})")
    if output:
        payload = (results[0].to_dict() if ensemble is None else
                   {"results": [r.to_dict() for r in results], "ensemble": asdict(ensemble)})
        write_json_atomic(output, payload)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="A training run folder (metrics.jsonl) or a results folder."),
    output: Path = typer.Option(None, "--output", "-o", help="Report .md path, or a folder for report.md (default: DIR/report.md)."),
    metrics: Path = typer.Option(None, "--metrics", help="A metrics.jsonl elsewhere to plot."),
    outputs: list[Path] = typer.Option(None, "--outputs", help="An outputs file elsewhere to add to the drift "
                                       "statistics (length, distinct-1/2, self-BLEU, repetition); repeatable."),
) -> None:
    """Write a markdown report with PNG figures from a run or results folder."""
    from cmerl.report import write_report  # deferred: torch, via cmerl.report (torch-free CLI start)

    try:
        rep = write_report(directory, output=output, metrics=metrics, outputs=outputs or ())
    except _user_errors() as exc:
        _fail(str(exc))
    print(f"wrote {rep.path} ({len(rep.figures)} figures from {len(rep.inputs)} inputs)")


@app.command("eval")
def eval_cmd(
    trained: str = typer.Option(None, "--trained", help="Trained model: training output folder or model name."),
    base: str = typer.Option(None, "--base", help="Base model name or folder."),
    system: list[str] = typer.Option(None, "--system", "-s", help="A system to compare (repeat; any number): a "
                                     "model or training run folder, an AlpacaEval outputs file, or "
                                     "gpt4_1106_preview (the bundled GPT-4 Turbo answers); LABEL=SPEC names it. "
                                     "Writes matrix.md (win rate of row over column) and pairs/<A>__vs__<B>/."),
    against: str = typer.Option(None, "--against", help="With --system: judge each system only against this "
                                "label (default: every pair)."),
    judge: list[str] = JUDGES, judge_url: str = JUDGE_URL, judge_api: str = JUDGE_API,
    api_key_env: str = API_KEY_ENV, logprobs: bool = LOGPROBS, template_from: str = TEMPLATE_FROM,
    judge_dtype: str = JUDGE_DTYPE, max_response_chars: int = MAX_CHARS, threshold: float = THRESHOLD,
    require_consistent: bool = CONSISTENT, prompt_file: Path = PROMPT_FILE, concurrency: int = CONCURRENCY,
    prefix_reuse: bool = PREFIX_REUSE,
    judge_mode: str = JUDGE_MODE, references: Path = REFERENCES,
    prompts: str = typer.Option("alpaca_eval:50", "--prompts", "-p", help="Prompt set (see cmerl generate)."),
    output_dir: Path = typer.Option(Path("eval_results"), "--output-dir", "-o", help="Results folder."),
    max_new_tokens: int = typer.Option(512, help="Most tokens generated per prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default)."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    dtype: str = dtype_option("Weights (while generating)"),
    system_prompt: str = typer.Option(None, help="System turn for both models (e.g. the one used in training)."),
    seed: int = typer.Option(0, help="Sampling and bootstrap seed."),
) -> None:
    """Trained vs base in one command (generate both, judge both orders, win rate with CI, report), or any
    number of systems with --system: a win-rate matrix plus a report per pair."""
    # deferred: torch, via cmerl.evaluation and cmerl.generation and cmerl.judging (torch-free CLI start)
    from cmerl.evaluation import EvalPlan, run_eval
    from cmerl.generation import GenerationConfig
    from cmerl.judging import DecisionRule

    console = _console()
    if system and (trained or base):
        _fail("pass --trained/--base or --system (several), not both")
    if not system and not (trained and base):
        _fail("pass --trained and --base, or two or more --system")
    # deferred: torch, via cmerl.judge_modes (torch-free CLI start)
    from cmerl.judge_modes import DEFAULT_MODE

    # one plain judge on trained vs base: the classic layout (outputs_trained/base.json, verdicts.jsonl)
    two_models = not system and len(judge) == 1 and (judge_mode or DEFAULT_MODE) == "pairwise" and ":" not in judge[0]
    try:
        spec = _judge_spec(judge[0], judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype,
                           max_response_chars, prompt_file, concurrency, prefix_reuse)
        generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                      batch_size=batch_size, dtype=dtype, system_prompt=system_prompt)
        rule = DecisionRule(threshold, require_consistent)
        builders = _judge_builders(judge, spec, judge_mode, references)
        if two_models:
            plan = EvalPlan(trained=trained, base=base, prompts=prompts, output_dir=output_dir, seed=seed,
                            judge=spec, generation=generation, rule=rule)
            summary = run_eval(plan, log=lambda m: console.print(m))
        else:
            # deferred: torch, via cmerl.comparison (torch-free CLI start)
            from cmerl.comparison import parse_system, run_matrix

            systems = [parse_system(x) for x in (system or [f"trained={trained}", f"base={base}"])]
            result = run_matrix(systems, builders, prompts=prompts, output_dir=output_dir, generation=generation,
                                rule=rule, against=against, seed=seed, log=lambda m: console.print(m))
    except _user_errors() as exc:
        _fail(str(exc))
    if two_models:
        print(summary.text())
        print(f"report: {output_dir / 'report.md'}; summary: {output_dir / 'winrate.json'}")
        return
    print(result.table())
    print(f"matrix: {output_dir / 'matrix.md'}; report: {output_dir / 'report.md'}; pairs: {output_dir / 'pairs'}")
    failed = {m["name"] for p in result.pairs for m in p["panel"]["members"] if m.get("error")}
    if failed:
        _fail(f"judge(s) failed on some pairs: {', '.join(sorted(failed))} (see matrix.md)")
