"""``cmerl train`` and ``cmerl demo``: thin calls into :mod:`cmerl.training` and :mod:`cmerl.demo`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import typer
from rich.console import Console

from cmerl.cli.app import app, input_errors
from cmerl.configs import find_config, packaged_configs
from cmerl.data import PromptDataError


def _quiet_libraries() -> None:
    """Keep the console to cmerl's progress: no deprecation chatter or per-shard save bars."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    from transformers.utils import logging as hf_logging  # deferred: transformers (torch-free CLI start)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _user_errors() -> tuple[type[Exception], ...]:
    # deferred: torch, via cmerl.rewards and cmerl.training (torch-free CLI start)
    from cmerl.rewards import SelfVerificationError
    from cmerl.training import ConfigError, RunDirExistsError

    return input_errors(ConfigError, RunDirExistsError, PromptDataError, SelfVerificationError)


def _check_run(cfg, source, console, processes: int | None) -> None:
    """``cmerl train --check``: the models must resolve (packaged ones installed); prints the run plan."""
    # deferred: torch, via cmerl.training and cmerl.models (torch-free CLI start)
    from cmerl import training
    from cmerl.models import check_loadable

    names = [cfg.policy] + [v for v in cfg.verifiers if training.uses_verifiers(cfg) and not training.is_remote(v)]
    try:
        for name in names:
            check_loadable(name)  # resolves here: installed, a real path, or a hub id reachable or cached
    except _user_errors() as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    console.print(f"[green]config OK[/green]: {source}")
    typer.echo(training.describe_run(cfg, processes=processes))


def _load(config: Path | None, resume: Path | None, overrides: list[str], method: str | None, console):
    """The run config of a new run (``--config`` + ``--set`` + ``--method``) or of ``--resume RUN_DIR``;
    a usage error ends the command with exit code 2."""
    from cmerl import training  # deferred: torch, via cmerl.training (torch-free CLI start)

    if (config is None) == (resume is None):
        console.print("[red]give exactly one of --config FILE (new run) or --resume RUN_DIR[/red]")
        raise typer.Exit(2)
    try:
        if resume is not None:
            cfg = training.read_run_config(resume, overrides)
            if method is not None and method != cfg.method:
                raise training.ConfigError(f"{resume} is a {cfg.method} run; --method {method} cannot change it "
                                           "(start a new run instead)")
            return cfg
        return training.load_config(config, [*overrides, *([f"method={method}"] if method else [])])
    except _user_errors() as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _train(cfg, resume: bool, console) -> None:
    from cmerl import training  # deferred: torch, via cmerl.training (torch-free CLI start)

    try:
        result = training.train(cfg, resume=resume, progress=True, print_status=console.print)
    except _user_errors() as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if result.final_dir is not None:
        console.print(f"[bold green]done[/bold green]: run directory {result.run_dir}\n"
                      f"  metrics      {result.metrics_path}\n"
                      f"  run card     {result.run_dir / training.RUN_CARD_NAME}\n"
                      f"  checkpoint   {result.last_checkpoint}\n"
                      f"  final model  {result.final_dir}")


@app.command()
def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config: a file or a packaged name such as demo or paper/quality1 (`cmerl configs`; keys: --print-config)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: key=value (repeatable; trl.NAME=value for TRL passthrough)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this directory from its last complete checkpoint."),
    method: str = typer.Option(None, "--method", help="grpo (default), dpo (DPOTrainer on prompt/chosen/rejected rows) or distill (SFT on the verifier's answers, = cmerl distill); the config key `method`."),
    print_config: bool = typer.Option(False, "--print-config", help="Print every config key with its default and documentation, then exit."),
    check: bool = typer.Option(False, "--check", help="Validate the config and the model names, print what the run would do, then exit (loads no model)."),
    processes: int = typer.Option(None, "--processes", help="With --check: data-parallel processes to plan for (default: $WORLD_SIZE or 1)."),
) -> None:
    """Train a policy with GRPO on CME (or baseline) rewards through TRL's GRPOTrainer, or with a baseline
    method (--method dpo | distill) through TRL's DPOTrainer / SFTTrainer."""
    from cmerl import training  # deferred: torch, via cmerl.training (torch-free CLI start)

    console = Console(stderr=True, soft_wrap=True)
    if print_config:
        typer.echo(training.config_template(), nl=False)
        return
    _quiet_libraries()
    cfg = _load(config, resume, set_, method, console)
    if check:
        _check_run(cfg, config or resume, console, processes)
        return
    _train(cfg, resume is not None, console)


@app.command()
def distill(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config, the same as for `cmerl train`: a file or a packaged name (`cmerl configs`)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: key=value (repeatable)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this directory: missing teacher answers, then SFT from the last complete checkpoint."),
    check: bool = typer.Option(False, "--check", help="Validate the config and the model names, print what the run would do, then exit (loads no model)."),
    generate_only: bool = typer.Option(False, "--generate-only", help="Generate the verifier's answers (resumable) and exit; train later with --resume RUN_DIR (e.g. under accelerate launch)."),
    processes: int = typer.Option(None, "--processes", help="With --check: data-parallel processes to plan for (default: $WORLD_SIZE or 1)."),
) -> None:
    """The distillation baseline: the first verifier answers the training prompts (sampling settings recorded,
    resumable), then TRL's SFTTrainer fine-tunes the policy on those answers with the step and token budget
    of a GRPO run of the same config. Same run directory, checkpoints, run card and metrics.jsonl as
    `cmerl train`."""
    from cmerl import training  # deferred: torch, via cmerl.training (torch-free CLI start)

    console = Console(stderr=True, soft_wrap=True)
    _quiet_libraries()
    cfg = _load(config, resume, set_, "distill", console)
    if check:
        _check_run(cfg, config or resume, console, processes)
        return
    if generate_only:
        try:
            training.prepare_run_dir(cfg, resume=resume is not None, print_status=console.print)
            training.prepare_teacher_outputs(cfg, progress=True, print_status=console.print)
        except _user_errors() as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        console.print(f"[bold green]done[/bold green]: teacher answers in "
                      f"{Path(cfg.output_dir) / training.TEACHER_OUTPUTS_NAME}; train with "
                      f"`cmerl distill --resume {cfg.output_dir}`")
        return
    _train(cfg, resume is not None, console)


@app.command()
def demo(
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Run directory (default: runs/demo-<timestamp>)."),
    steps: int = typer.Option(None, "--steps", help="GRPO steps (default: the demo config's max_steps)."),
    config: Path = typer.Option(None, "--config", "-c", help="Use this config (a file or a packaged name) instead of the packaged demo config."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: key=value (repeatable)."),
    no_judge: bool = typer.Option(False, "--no-judge", help="Skip the head-to-head judging (saves about a minute)."),
    judge: str = typer.Option(None, "--judge", "-j", help="Judge model for the head-to-head (default: qwen2.5-coder-1.5b-instruct, dtype auto)."),
) -> None:
    """Train SmolLM2-135M-Instruct on CME from a Qwen2.5-Coder verifier for a few steps, then show
    before/after completions on held-out prompts with their CME scores and a judged head-to-head."""
    # deferred: torch, via cmerl.demo and cmerl.training (torch-free CLI start)
    from cmerl import demo as demo_mod
    from cmerl import training

    console = Console(stderr=True, soft_wrap=True)
    overrides = list(set_)
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    if steps is not None:
        overrides.append(f"max_steps={steps}")
    _quiet_libraries()
    try:
        cfg = training.load_config(config, overrides) if config is not None else demo_mod.demo_config(overrides)
    except _user_errors() as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    try:
        result = demo_mod.run_demo(cfg, judge=None if no_judge else (judge or demo_mod.DEMO_JUDGE),
                                   print_status=console.print)
    except _user_errors() as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(demo_mod.render_comparison(result))
    console.print(f"[bold green]demo done[/bold green] in {result.seconds / 60:.1f} min. Outputs in {result.run_dir}:\n"
                  f"  before/after samples  {result.samples_path}\n"
                  f"  metrics               {result.run_dir / training.METRICS_NAME}\n"
                  f"  run card              {result.run_dir / training.RUN_CARD_NAME}\n"
                  f"  completions table     {result.run_dir / 'completions'}\n"
                  + (f"  head-to-head verdicts {result.head_to_head.verdicts_path}  "
                     f"(`cmerl winrate {result.head_to_head.verdicts_path}`)\n" if result.head_to_head else "")
                  + f"  trained model         {result.final_dir}")


@app.command()
def configs(
    name: str = typer.Argument(None, help="A packaged config to print (e.g. demo, paper/quality1); none: list them."),
) -> None:
    """List the configs that ship with cmerl, or print one (copy it to edit: `cmerl configs demo > my.yaml`)."""
    if name is None:
        typer.echo("\n".join(packaged_configs()))
        return
    try:
        typer.echo(find_config(name).read_text(encoding="utf-8"), nl=False)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
