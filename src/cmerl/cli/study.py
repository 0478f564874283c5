"""``cmerl study run|status|table``: thin calls into :mod:`cmerl.study` (the replication study, issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cmerl.cli.app import app, input_errors
from cmerl.cli.train import _quiet_libraries
from cmerl.configs import CONFIG_ROOT
from cmerl.data import PromptDataError
from cmerl.study import PHASES, StudyError, row_names, row_status, run_row, study_table, update_table_files

study_app = typer.Typer(help="The replication study: train, evaluate and report one row of configs/study/.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")

CONFIG_DIR = typer.Option(CONFIG_ROOT / "study", "--config-dir", show_default="the packaged configs/study",
                          help="Folder of the row files (ROW.yaml).")
RUNS_DIR = typer.Option(Path("runs/study"), "--runs-dir", help="Where weights and checkpoints go (git-ignored).")
RESULTS_DIR = typer.Option(Path("benchmarks/results/study"), "--results-dir",
                           help="Where the committed results go (one folder per row).")


def _errors() -> tuple[type[Exception], ...]:
    # deferred: torch, via cmerl.rewards and cmerl.training (torch-free CLI start)
    from cmerl.rewards import SelfVerificationError
    from cmerl.training import ConfigError, RunDirExistsError

    return input_errors(StudyError, ConfigError, RunDirExistsError, PromptDataError, SelfVerificationError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _budget(values: list[str]) -> dict[str, int]:
    out = {}
    for v in values:
        phase, _, n = v.partition("=")
        if not n.strip().isdigit():
            _fail(f"--budget expects PHASE=N (got {v!r})")
        out[phase.strip()] = int(n)
    return out


@study_app.command("run")
def run(
    rows: list[str] = typer.Argument(None, help="Row names (configs/study/ROW.yaml) or row YAML files, run one "
                                     "after another."),
    all_rows: bool = typer.Option(False, "--all", help="Every row in --config-dir, in order (finished phases "
                                  "are skipped, so done rows cost seconds)."),
    phases: str = typer.Option(None, "--phases", help="Comma list of phases to run (default: all, in order: "
                               "train, heldout, generate, judge, report)."),
    budget: list[str] = typer.Option([], "--budget", help="PHASE=N: at most N new units in this call (train: "
                                     "steps; heldout/generate: prompts per file; judge: pairs); repeatable."),
    config_dir: Path = CONFIG_DIR, runs_dir: Path = RUNS_DIR, results_dir: Path = RESULTS_DIR,
) -> None:
    """Run or continue rows: each phase skips what is done and resumes what was interrupted. Several rows
    run in the order given; the first that fails stops the queue (the rows before it keep their results),
    one left incomplete by --budget does not."""
    _quiet_libraries()
    if all_rows == bool(rows):
        _fail("give row names or --all (not both)")
    names = row_names(config_dir) if all_rows else list(rows)
    chosen = [p.strip() for p in phases.split(",") if p.strip()] if phases else list(PHASES)
    budgets = _budget(budget)
    for i, row in enumerate(names):
        if len(names) > 1:
            typer.echo(f"== row {i + 1}/{len(names)}: {row}")
        try:
            result = run_row(row, config_dir=config_dir, runs_root=runs_dir, results_root=results_dir,
                             phases=chosen, budget=budgets, progress=True, print_status=typer.echo)
        except _errors() as exc:
            left = f" (not run: {', '.join(names[i + 1:])})" if names[i + 1:] else ""
            _fail(f"row {row}: {exc}{left}")
        status = "complete" if result.complete else "not complete (rerun the same command to continue)"
        typer.echo(f"row {result.row}: {status}; results in {result.paths.results}, weights in {result.paths.runs}")


@study_app.command("status")
def status(
    row: str = typer.Argument(None, help="Row name (default: every row in --config-dir)."),
    config_dir: Path = CONFIG_DIR, runs_dir: Path = RUNS_DIR, results_dir: Path = RESULTS_DIR,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Where each row stands (training step, outputs and verdicts written); copies the training metrics into
    the results folder. Loads no model."""
    names = [Path(row).stem] if row else row_names(config_dir)
    states = [row_status(n, runs_root=runs_dir, results_root=results_dir) for n in names]
    if as_json:
        typer.echo(json.dumps(states, indent=1))
        return
    for s in states:
        files = "; ".join(f"{k}: {v}" for k, v in s["files"].items()) or "no outputs yet"
        typer.echo(f"{s['row']}: checkpoint step {s['last_checkpoint_step']}, logged step {s['last_logged_step']}, "
                   f"final {'yes' if s['final'] else 'no'}, report {'yes' if s['report'] else 'no'}; {files}")


@study_app.command("table")
def table(
    results_dir: Path = RESULTS_DIR,
    write: list[Path] = typer.Option([Path("docs/study.md"), Path("benchmarks/RESULTS.md")], "--write",
                                     help="Files whose study table (between the markers) is regenerated."),
    print_only: bool = typer.Option(False, "--print", help="Only print the table; write nothing."),
) -> None:
    """Regenerate the study table from the result folders (row.json of each row)."""
    if print_only:
        typer.echo(study_table(results_dir))
        return
    changed = update_table_files(write, results_dir)
    typer.echo(study_table(results_dir))
    typer.echo(f"updated: {', '.join(map(str, changed)) or 'nothing (already current)'}")
