"""``cmerl eval-math`` and ``cmerl separation``: thin calls into :mod:`cmerl.math_eval` and
:mod:`cmerl.separation`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from cmerl.answers import ANSWER_FORMATS
from cmerl.cli.app import app, dtype_option, input_errors
from cmerl.math_eval import MathEvalSettings, evaluate_math, format_summary
from cmerl.problems import ProblemDataError

DATASET_HELP = ("Problem set: gsm8k[:N] (GSM8K test), gsm8k_train[:N], math500[:N], or a hub id "
                "(openai/gsm8k, HuggingFaceH4/MATH-500, DigitalLearningGmbH/MATH-lighteval) where the hub is "
                "reachable; gsm8k:50 is the first 50 problems.")
FORMAT_HELP = "Where the final answer is: auto (last \\boxed{} or '#### N', whichever is last), boxed or gsm8k."


def _user_errors() -> tuple[type[Exception], ...]:
    return input_errors(ValueError, ProblemDataError)


def _console():
    return Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    _console().print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(1)


def _check_format(value: str) -> str:
    if value not in ANSWER_FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(ANSWER_FORMATS)}")
    return value


@app.command("eval-math")
def eval_math(
    model: str = typer.Option(..., "--model", "-m", help="Model name or folder (packaged alias, HF folder, "
                              ".gguf, training output folder)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help=DATASET_HELP),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder for job.json, generations.json, "
                                    "records.jsonl, summary.json (rerun to resume)."),
    samples: int = typer.Option(1, "--samples", "-k", help="Solutions per problem (k > 1 needs --temperature > 0: "
                                "pass@k and maj@k)."),
    temperature: float = typer.Option(0.0, help="0 = greedy (pass@1); > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling (only when sampling)."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per solution."),
    seed: int = typer.Option(0, help="Sampling seed (each batch: seed + index of its first prompt)."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    dtype: str = dtype_option("Weights (while generating)"),
    system_prompt: str = typer.Option(None, help="System turn for chat templates (default: none)."),
    answer_format: str = typer.Option("auto", callback=_check_format, help=FORMAT_HELP),
    split: str = typer.Option("test", help="Split of a hub dataset."),
) -> None:
    """Accuracy on maths problems: greedy pass@1, or pass@k / maj@k over k samples; graded by math-verify."""
    console = _console()
    try:
        settings = MathEvalSettings(samples=samples, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, dtype=dtype,
                                    system_prompt=system_prompt, answer_format=answer_format, split=split)
        result = evaluate_math(model, dataset, output_dir, settings, progress=True, print_status=console.print)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(format_summary(result), highlight=False)
    console.print(f"per-solution records in {output_dir / 'records.jsonl'}; summary in {output_dir / 'summary.json'}")


@app.command()
def separation(
    policy: str = typer.Option(..., "--policy", "-p", help="Model that writes the solutions (name or folder)."),
    verifier: list[str] = typer.Option(..., "--verifier", "-v", help="Model whose likelihood is tested (name or "
                                       "folder); repeat to compare several on the same solutions."),
    dataset: str = typer.Option(..., "--dataset", "-d", help=DATASET_HELP),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder for job.json, generations.json, "
                                    "records.jsonl, verifier_<name>.json, separation.json (rerun to resume; "
                                    "a rerun with another --verifier reuses the solutions)."),
    samples: int = typer.Option(4, "--samples", "-k", help="Solutions sampled per problem."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling."),
    max_new_tokens: int = typer.Option(256, help="Most tokens per solution."),
    seed: int = typer.Option(0, help="Sampling and bootstrap seed."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    dtype: str = dtype_option("Policy weights", "--dtype"),
    verifier_dtype: str = dtype_option("Verifier weights", "--verifier-dtype"),
    batch_tokens: int = typer.Option(4096, help="Token budget of one scoring batch."),
    system_prompt: str = typer.Option(None, help="System turn for the policy's chat template (default: none)."),
    answer_format: str = typer.Option("auto", callback=_check_format, help=FORMAT_HELP),
    split: str = typer.Option("test", help="Split of a hub dataset."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples (over problems)."),
) -> None:
    """AUROC of verifier likelihood (whole solution and answer span, cross-entropy and entropy) for telling
    correct from wrong sampled solutions, next to the policy's self-likelihood and a length baseline."""
    # deferred: torch, via cmerl.separation (torch-free CLI start)
    from cmerl.separation import SeparationSettings, format_table, run_separation

    console = _console()
    try:
        settings = SeparationSettings(samples=samples, temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, dtype=dtype,
                                      system_prompt=system_prompt, answer_format=answer_format, split=split,
                                      n_boot=n_boot)
        result = run_separation(policy, verifier, dataset, output_dir, settings, verifier_dtype=verifier_dtype,
                                batch_tokens=batch_tokens, progress=True, print_status=console.print)
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(format_table(result))
    console.print(f"records in {output_dir / 'records.jsonl'}; table in {output_dir / 'separation.json'}")
