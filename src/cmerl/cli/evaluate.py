"""Evaluation commands: ``generate``, ``judge``, ``winrate``, ``judge-check``, ``reward-check``, ``report``,
``eval``. Each is a thin call into :mod:`cmerl.generation`, :mod:`cmerl.judging`, :mod:`cmerl.evaluation`
and :mod:`cmerl.report`."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from cmerl.cli.app import app, dtype_option, input_errors

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
CONCURRENCY = typer.Option(4, "--concurrency", help="Endpoint judges: parallel requests.")


def _judge_spec(judge, judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype, max_chars,
                prompt_file, concurrency):
    from cmerl.judging import JudgeSpec

    if judge_api not in ("chat", "completions"):
        raise typer.BadParameter(f"--judge-api must be chat or completions (got {judge_api!r})")
    return JudgeSpec(judge, base_url=judge_url, api=judge_api, api_key_env=api_key_env, logprobs=logprobs,
                     template_tokenizer=template_from, dtype=judge_dtype, max_response_chars=max_chars,
                     prompt_path=str(prompt_file) if prompt_file else None, concurrency=concurrency)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input or setup: reported as one ``error:`` line, exit code 1."""
    from cmerl.judging import JudgeConnectionError

    return input_errors(ValueError, JudgeConnectionError)


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    _console().print(f"[red]error:[/red] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(1)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if Path(name).exists() else name).strip("_")


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
    judge: str = JUDGE, judge_url: str = JUDGE_URL, judge_api: str = JUDGE_API, api_key_env: str = API_KEY_ENV,
    logprobs: bool = LOGPROBS, template_from: str = TEMPLATE_FROM, judge_dtype: str = JUDGE_DTYPE,
    max_response_chars: int = MAX_CHARS, threshold: float = THRESHOLD, require_consistent: bool = CONSISTENT,
    prompt_file: Path = PROMPT_FILE, concurrency: int = CONCURRENCY,
    limit: int = typer.Option(None, "--limit", help="Judge at most this many new pairs in this run."),
) -> None:
    """Judge A against B on the instructions they share, each pair in both orders; prints the win rate."""
    from cmerl.evaluation import summarize_verdicts
    from cmerl.judging import DecisionRule, load_pairs, run_judge, verdicts_header

    console = _console()
    try:
        pairs, warnings = load_pairs(a, b)
        rule = DecisionRule(threshold, require_consistent)
        spec = _judge_spec(judge, judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype,
                           max_response_chars, prompt_file, concurrency)
        for w in warnings:
            console.print(f"[yellow]warning: {w}[/yellow]")
        j = spec.build()
        header = verdicts_header(j, rule, j.prompt, a={"path": str(a), "generator": pairs[0].generator_a},
                                 b={"path": str(b), "generator": pairs[0].generator_b})
        run_judge(j, pairs, output, rule=rule, header=header, progress=True, stop_after=limit)
        summary = summarize_verdicts(output)
    except _user_errors() as exc:
        _fail(str(exc))
    print(summary.text())


@app.command()
def winrate(
    verdicts: Path = typer.Argument(..., help="Verdicts JSONL written by cmerl judge / eval."),
    json_out: Path = typer.Option(None, "--json", help="Also write the summary as JSON here."),
    n_boot: int = typer.Option(10_000, help="Bootstrap resamples."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Wins / ties / losses, tie-adjusted win rate with a bootstrap CI, consistency and lengths."""
    from cmerl.evaluation import summarize_verdicts
    from cmerl.io import write_json_atomic

    try:
        summary = summarize_verdicts(verdicts, n_boot=n_boot, seed=seed)
    except _user_errors() as exc:
        _fail(str(exc))
    if json_out:
        write_json_atomic(json_out, summary.to_dict())
    print(summary.text())


@app.command("judge-check")
def judge_check(
    judge: str = JUDGE, judge_url: str = JUDGE_URL, judge_api: str = JUDGE_API, api_key_env: str = API_KEY_ENV,
    logprobs: bool = LOGPROBS, template_from: str = TEMPLATE_FROM, judge_dtype: str = JUDGE_DTYPE,
    max_response_chars: int = MAX_CHARS, threshold: float = THRESHOLD, require_consistent: bool = CONSISTENT,
    prompt_file: Path = PROMPT_FILE, concurrency: int = CONCURRENCY,
    n: int = typer.Option(40, "--n", help="Annotated pairs to judge (the bundled file has 80)."),
    data: Path = typer.Option(None, "--data", help="AlpacaEval annotations JSON (instruction, output_1, output_2, "
                              "preference) instead of the bundled sample."),
    output_dir: Path = typer.Option(None, "--output-dir", help="Where verdicts.jsonl and judge_check.json go "
                                    "(default: judge_check/<judge>)."),
) -> None:
    """Agreement of a judge with GPT-4 Turbo's AlpacaEval verdicts (gpt4_1106_preview vs gemma-2b-it)."""
    from cmerl.evaluation import judge_check as run_check
    from cmerl.io import write_json_atomic
    from cmerl.judging import DecisionRule

    out = output_dir or Path("judge_check") / _slug(judge)
    try:
        spec = _judge_spec(judge, judge_url, judge_api, api_key_env, logprobs, template_from, judge_dtype,
                           max_response_chars, prompt_file, concurrency)
        rule = DecisionRule(threshold, require_consistent)
        result = run_check(spec.build(), output=out / "verdicts.jsonl", n=n, data=data, rule=rule, progress=True)
    except _user_errors() as exc:
        _fail(str(exc))
    write_json_atomic(out / "judge_check.json", result.to_dict())
    print(result.summary())
    print(f"reference (GPT-4 Turbo) preferred output_2 in {result.reference_b_wins} of {result.n} pairs; "
          f"wrote {out / 'judge_check.json'}")


@app.command("reward-check")
def reward_check(
    verifier: str = typer.Option(..., "--verifier", "-v", help="Verifier model name."),
    data: Path = typer.Option(None, "--data", help="JSONL/JSON with prompt, chosen, rejected (default: the bundled "
                              "UltraFeedback pairs)."),
    n: int = typer.Option(200, "--n", help="Pairs to check (first n)."),
    rejected: str = typer.Option("data", "--rejected", help="What chosen is compared with: 'data' (the pairs' "
                                 "rejected answers) or 'off-topic' (another prompt's chosen answer: does the "
                                 "reward depend on the prompt?)."),
    signals: str = typer.Option("mean_logprob,sum_logprob,neg_entropy", help="Comma-separated signals."),
    dtype: str = dtype_option("Verifier weights"),
    batch_tokens: int = typer.Option(4096, help="Token budget of one scoring batch."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the result as JSON here."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """How often each verifier signal prefers the chosen response, vs a length-only baseline."""
    from cmerl.evaluation import REJECTED_MODES, load_preference_pairs
    from cmerl.evaluation import reward_check as run_check
    from cmerl.io import write_json_atomic
    from cmerl.scoring import SIGNALS, Verifier

    names = [s.strip() for s in signals.split(",") if s.strip()]
    bad = [s for s in names if s not in SIGNALS]
    if bad or not names:
        _fail(f"unknown signal(s) {bad}; use some of {', '.join(SIGNALS)}")
    if rejected not in REJECTED_MODES:
        _fail(f"--rejected must be one of {', '.join(REJECTED_MODES)} (got {rejected!r})")
    try:
        pairs = load_preference_pairs(data, n)
        v = Verifier.from_pretrained(verifier, dtype=dtype, max_batch_tokens=batch_tokens)
        result = run_check(v, pairs, signals=names, seed=seed, progress=True, rejected=rejected,
                           data=str(data) if data else "cmerl/data/ultrafeedback_1000.jsonl")
    except _user_errors() as exc:
        _fail(str(exc))
    if output:
        write_json_atomic(output, result.to_dict())
    kind = "preference pairs" if rejected == "data" else "prompts, each answer against another prompt's"
    print(f"verifier {verifier} on {result.n} {kind} ({result.data}); {result.seconds:.0f}s")
    print(result.table())
    print(f"mean tokens: chosen {result.mean_tokens_chosen:.0f}, rejected {result.mean_tokens_rejected:.0f}; "
          f"truncated responses: {result.truncated}")


@app.command()
def report(
    directory: Path = typer.Argument(..., help="A training run folder (metrics.jsonl) or a results folder."),
    output: Path = typer.Option(None, "--output", "-o", help="Report .md path, or a folder for report.md (default: DIR/report.md)."),
    metrics: Path = typer.Option(None, "--metrics", help="A metrics.jsonl elsewhere to plot."),
) -> None:
    """Write a markdown report with PNG figures from a run or results folder."""
    from cmerl.report import write_report

    try:
        rep = write_report(directory, output=output, metrics=metrics)
    except _user_errors() as exc:
        _fail(str(exc))
    print(f"wrote {rep.path} ({len(rep.figures)} figures from {len(rep.inputs)} inputs)")


@app.command("eval")
def eval_cmd(
    trained: str = typer.Option(..., "--trained", help="Trained model: training output folder or model name."),
    base: str = typer.Option(..., "--base", help="Base model name or folder."),
    judge: str = JUDGE, judge_url: str = JUDGE_URL, judge_api: str = JUDGE_API, api_key_env: str = API_KEY_ENV,
    logprobs: bool = LOGPROBS, template_from: str = TEMPLATE_FROM, judge_dtype: str = JUDGE_DTYPE,
    max_response_chars: int = MAX_CHARS, threshold: float = THRESHOLD, require_consistent: bool = CONSISTENT,
    prompt_file: Path = PROMPT_FILE, concurrency: int = CONCURRENCY,
    prompts: str = typer.Option("alpaca_eval:50", "--prompts", "-p", help="Prompt set (see cmerl generate)."),
    output_dir: Path = typer.Option(Path("eval_results"), "--output-dir", "-o", help="Results folder."),
    max_new_tokens: int = typer.Option(512, help="Most tokens generated per prompt."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default)."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    dtype: str = dtype_option("Weights (while generating)"),
    system_prompt: str = typer.Option(None, help="System turn for both models (e.g. the one used in training)."),
    seed: int = typer.Option(0, help="Sampling and bootstrap seed."),
) -> None:
    """Trained vs base in one command: generate both, judge both orders, win rate with CI, report."""
    from cmerl.evaluation import EvalPlan, run_eval
    from cmerl.generation import GenerationConfig
    from cmerl.judging import DecisionRule

    console = _console()
    try:
        plan = EvalPlan(trained=trained, base=base, prompts=prompts, output_dir=output_dir, seed=seed,
                        judge=_judge_spec(judge, judge_url, judge_api, api_key_env, logprobs, template_from,
                                          judge_dtype, max_response_chars, prompt_file, concurrency),
                        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                    seed=seed, batch_size=batch_size, dtype=dtype,
                                                    system_prompt=system_prompt),
                        rule=DecisionRule(threshold, require_consistent))
        summary = run_eval(plan, log=lambda m: console.print(m))
    except _user_errors() as exc:
        _fail(str(exc))
    print(summary.text())
    print(f"report: {output_dir / 'report.md'}; summary: {output_dir / 'winrate.json'}")
