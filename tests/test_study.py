"""The replication-study driver (``cmerl.study``, ``cmerl study``) on tiny random models with real tokenizers,
and ``random:<model>[@seed]`` model names.

One tiny row (2 GRPO steps, 2 held-out prompts, 3 evaluation prompts, a tiny judge) runs end to end once
uninterrupted and once stopped inside every phase in turn (``budget``), then continued: the second must
end with the same files as the first (no step, output or verdict lost or duplicated).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _training_helpers import (
    POLICY_TOKENIZER,
    VERIFIER_TOKENIZER,
    tiny_random_folder,
    write_prompts,
)

from cmerl import study
from cmerl.io import iter_jsonl

CMERL = str(Path(sys.executable).parent / "cmerl")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study-models")
    return {"policy": tiny_random_folder(root / "policy", POLICY_TOKENIZER, arch="llama", seed=0),
            "verifier": tiny_random_folder(root / "verifier", VERIFIER_TOKENIZER, arch="qwen2", seed=1),
            "judge": tiny_random_folder(root / "judge", VERIFIER_TOKENIZER, arch="qwen2", seed=2)}


def write_row(tmp: Path, models: dict[str, Path], name: str = "row-tiny", **train_overrides) -> Path:
    prompts = write_prompts(tmp / "prompts.jsonl")
    evals = tmp / "eval_prompts.jsonl"
    evals.write_text("".join(json.dumps({"instruction": t}) + "\n"
                             for t in ("Name a fruit.", "What is snow?", "Say goodbye.")))
    train = {"policy": str(models["policy"]), "verifiers": [str(models["verifier"])], "verifier_dtype": "float32",
             "prompts": str(prompts), "max_prompt_length": 128, "heldout_prompts": 2, "num_generations": 4,
             "per_device_train_batch_size": 8, "max_completion_length": 6, "mask_truncated_completions": False,
             "learning_rate": 1e-3, "max_steps": 2, "save_steps": 1, "save_total_limit": None, "seed": 0,
             "report_to": [], "log_completions": False, **train_overrides}
    row = {"title": "tiny row", "regime": "instruct",
           "families": {"policy": "tiny llama", "verifier": "tiny qwen2", "judge": "tiny qwen2 (other seed)"},
           "train": train,
           "eval": {"prompts": str(evals), "judge": str(models["judge"]), "judge_dtype": "float32",
                    "max_new_tokens": 5, "dtype": "float32", "batch_size": 2}}
    cdir = tmp / "configs"
    cdir.mkdir(exist_ok=True)
    path = cdir / f"{name}.yaml"
    path.write_text("# tiny test row\n" + yaml.safe_dump(row, sort_keys=False))
    return path


def _run(tmp: Path, row: str = "row-tiny", **kw) -> study.RowRun:
    return study.run_row(row, config_dir=tmp / "configs", runs_root=tmp / "runs", results_root=tmp / "results", **kw)


def _snapshot(results: Path) -> dict:
    """What must not depend on interruptions: steps and rewards, outputs, verdicts, held-out scores."""
    metrics = [(r["step"], round(r["reward"], 4)) for r in iter_jsonl(results / "metrics.jsonl")]
    outs = {f: [(r["index"], r["output"]) for r in json.loads((results / f).read_text())]
            for f in ("outputs_trained.json", "outputs_base.json", "heldout_outputs_trained.json",
                      "heldout_outputs_base.json")}
    verdicts = [(r["index"], r["verdict"], round(r["margin"], 4)) for i, r in
                enumerate(iter_jsonl(results / "verdicts.jsonl")) if i > 0]
    held = json.loads((results / "heldout.json").read_text())["systems"]
    return {"metrics": metrics, "outputs": outs, "verdicts": verdicts,
            "heldout": {k: [round(c, 4) for c in v["cme"]] for k, v in held.items()}}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, models):
    tmp = tmp_path_factory.mktemp("study-full")
    write_row(tmp, models)
    run = _run(tmp)
    return tmp, run


@pytest.mark.e2e
def test_tiny_row_runs_end_to_end(full_run):
    tmp, run = full_run
    res = tmp / "results" / "row-tiny"
    assert run.complete, run.phases
    assert [p.phase for p in run.phases] == list(study.PHASES)
    for f in ("metrics.jsonl", "train_config.yaml", "heldout.json", "outputs_trained.json", "outputs_base.json",
              "verdicts.jsonl", "winrate.json", "report.md", "row.json", "row_config.json", "state.json",
              "study_log.jsonl"):
        assert (res / f).is_file(), f
    assert not list(res.rglob("*.safetensors")), "weights must stay under runs/"
    assert (tmp / "runs" / "row-tiny" / "train" / "final" / "model.safetensors").is_file()
    row = json.loads((res / "row.json").read_text())
    assert row["steps"] == 2 and row["vs_base"]["n"] == 3
    assert row["vs_base"]["wins"] + row["vs_base"]["ties"] + row["vs_base"]["losses"] == 3
    assert row["train_wall_s"] > 0
    assert set(row["heldout"]) == {"trained", "base", "verifier"} and row["heldout"]["trained"]["n"] == 2
    assert row["machines"] and "float32" in json.dumps(row["drift"]["trained"]["weights_dtype"])
    # a second call finds everything done and changes nothing
    before = _snapshot(res)
    again = _run(tmp)
    assert again.complete and _snapshot(res) == before


@pytest.mark.e2e
def test_row_stopped_in_every_phase_continues_without_loss_or_duplication(tmp_path, models, full_run):
    write_row(tmp_path, models)
    stops = [{"train": 1}, {"heldout": 1}, {"generate": 1}, {"judge": 1}]
    expected_incomplete = ["train", "heldout", "generate", "judge"]
    for budget, phase in zip(stops, expected_incomplete):
        run = _run(tmp_path, budget=budget)
        assert not run.complete and run.phases[-1].phase == phase and not run.phases[-1].done, run.phases
    res = tmp_path / "results" / "row-tiny"
    assert (res / "outputs_trained.json.partial.jsonl").exists() is False  # generate finished on the 4th call
    assert _run(tmp_path).complete
    snap = _snapshot(res)
    assert [s for s, _ in snap["metrics"]] == [1, 2]
    assert snap == _snapshot(full_run[0] / "results" / "row-tiny")


@pytest.mark.e2e
def test_row_killed_while_judging_continues(tmp_path, models):
    """A real SIGKILL of `cmerl study run` in the judge phase; the rerun finishes with one row per pair."""
    write_row(tmp_path, models)
    _run(tmp_path, phases=["train", "heldout", "generate"])
    res = tmp_path / "results" / "row-tiny"
    line = next(ln for ln in study.study_table(tmp_path / "results").splitlines() if ln.startswith("| row-tiny |"))
    assert "| trained |" in line and line.endswith("| in progress: judge |"), line
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [CMERL, "study", "run", "row-tiny", "--config-dir", str(tmp_path / "configs"), "--runs-dir",
           str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (res / "verdicts.jsonl").is_file():  # the header is written before the first pair
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = list(iter_jsonl(res / "verdicts.jsonl"))[1:]
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    assert (res / "row.json").is_file()


def test_changed_row_settings_are_refused(tmp_path, models):
    write_row(tmp_path, models)
    _run(tmp_path, phases=["train"], budget={"train": 1})
    write_row(tmp_path, models, learning_rate=5e-4)
    with pytest.raises(study.StudyError, match="other train settings"):
        _run(tmp_path)


def test_a_judge_that_is_the_verifier_is_refused(tmp_path, models):
    path = write_row(tmp_path, models)
    row = yaml.safe_load(path.read_text())
    row["eval"]["judge"] = str(models["verifier"])
    path.write_text(yaml.safe_dump(row))
    with pytest.raises(study.StudyError, match="is the row's verifier"):
        study.load_row("row-tiny", config_dir=tmp_path / "configs")
    row["train"]["output_dir"] = "elsewhere"
    path.write_text(yaml.safe_dump(row))
    with pytest.raises(study.StudyError, match="set by the driver"):
        study.load_row("row-tiny", config_dir=tmp_path / "configs")
    with pytest.raises(FileNotFoundError, match="rows in"):
        study.load_row("no-such-row", config_dir=tmp_path / "configs")


@pytest.mark.e2e
def test_study_table_regenerates_from_result_folders(full_run, tmp_path):
    from typer.testing import CliRunner

    from cmerl.cli import app

    tmp, _ = full_run
    results = tmp / "results"
    doc = tmp_path / "study.md"
    doc.write_text("# Study\n\nintro\n")
    out = CliRunner().invoke(app, ["study", "table", "--results-dir", str(results), "--write", str(doc)])
    assert out.exit_code == 0, out.output
    text = doc.read_text()
    assert text.startswith("# Study\n\nintro\n") and study.TABLE_START in text and study.TABLE_END in text
    row = json.loads((results / "row-tiny" / "row.json").read_text())
    v = dict(row["vs_base"])
    line = next(ln for ln in text.splitlines() if ln.startswith("| row-tiny |"))
    assert f"| {v['wins']}/{v['ties']}/{v['losses']} |" in line
    assert f"{100 * v['win_rate']:.1f}% [{100 * v['ci_low']:.1f}%-{100 * v['ci_high']:.1f}%]" in line
    # regenerating replaces the block in place (idempotent), and a changed result shows up
    assert study.update_table_files([doc], results) == []
    original = (results / "row-tiny" / "row.json").read_text()
    row["vs_base"].update(wins=v["wins"] + 7, win_rate=0.125)
    (results / "row-tiny" / "row.json").write_text(json.dumps(row))
    try:
        assert study.update_table_files([doc], results) == [doc]
        assert doc.read_text().count(study.TABLE_START) == 1
        assert f"| {v['wins'] + 7}/{v['ties']}/{v['losses']} | 12.5% [" in doc.read_text()
    finally:
        (results / "row-tiny" / "row.json").write_text(original)


def test_table_names_no_verifier_for_a_reward_that_reads_only_the_policy():
    assert study._reward_cell({"rewards": ["cme"], "verifiers": ["qwen2.5-coder-0.5b-instruct"]}) == "cme (qwen2.5-coder-0.5b-instruct)"
    assert study._reward_cell({"rewards": ["self_certainty"], "verifiers": ["qwen2.5-coder-0.5b-instruct"]}) == "self_certainty (the policy's own)"
    assert study._reward_cell({"rewards": ["self_certainty", "cme"], "verifiers": ["v"]}) == "self_certainty+cme (v)"


def test_table_names_the_baselines_by_method_not_by_their_unused_reward_default():
    """A distill row keeps TrainConfig's default ``rewards: [cme]``, which it never trains on."""
    assert study._reward_cell({"rewards": ["cme"], "verifiers": ["qwen2.5-coder-0.5b-instruct"],
                              "method": "distill"}) == (
        "distill: SFT on qwen2.5-coder-0.5b-instruct's answers")
    assert study._reward_cell({"rewards": ["cme"], "verifiers": [], "method": "dpo"}) == "dpo (preference pairs)"
    assert study._reward_cell({"rewards": ["cme"], "verifiers": ["v"], "method": "grpo"}) == "cme (v)"
    assert study._reward_cell({"rewards": ["cme"], "verifiers": ["v"], "method": "grpo",
                               "advantage_estimator": "position_std"}) == "cme, dense position_std (v)"


def test_training_wall_time_counts_killed_attempts_to_their_last_logged_step():
    events = [{"phase": "train", "event": "start", "time": 100.0}, {"phase": "train", "event": "start", "time": 200.0},
              {"phase": "train", "event": "end", "time": 260.0}]
    metrics = [{"step": 1, "time": 130.0}, {"step": 2, "time": 150.0}, {"step": 3, "time": 250.0}]
    assert study.training_wall_seconds(events, metrics) == pytest.approx(50.0 + 60.0)
    assert study.training_wall_seconds([], metrics) is None


# --------------------------------------------------------------------------- random:<model>[@seed]
def test_random_model_names_parse_and_resolve(models):
    from cmerl.models import parse_random_name, resolve

    assert parse_random_name("random:qwen2.5-coder-0.5b-instruct") == ("qwen2.5-coder-0.5b-instruct", 0)
    assert parse_random_name("random:qwen2.5-coder-0.5b-instruct@7") == ("qwen2.5-coder-0.5b-instruct", 7)
    src = resolve(f"random:{models['verifier']}@3")
    assert src.kind == "random" and src.identity == f"random:folder:{models['verifier'].resolve()}@3"
    assert resolve(f"random:{models['verifier']}").identity != resolve(str(models["verifier"])).identity
    for bad, why in [("random:", "no model"), ("random:x@-1", "integer"), ("random:x@a", "integer"),
                     ("random:random:x", "nested")]:
        with pytest.raises(ValueError, match=why):
            resolve(bad)


def test_random_weights_are_deterministic_and_keep_the_architecture(models, tmp_path, monkeypatch):
    from cmerl.models import load_model, load_tokenizer

    base_model, base_tok = load_model(str(models["verifier"]), dtype="float32")
    name = f"random:{models['verifier']}@5"
    loaded = []
    for cache in ("a", "b"):  # two fresh caches: built twice, independently
        monkeypatch.setenv("CMERL_CACHE", str(tmp_path / cache))
        loaded.append(load_model(name, dtype="float32")[0].state_dict())
    monkeypatch.setenv("CMERL_CACHE", str(tmp_path / "a"))
    other_seed = load_model(f"random:{models['verifier']}@6", dtype="float32")[0].state_dict()
    base = base_model.state_dict()
    assert loaded[0].keys() == base.keys() and all(loaded[0][k].shape == base[k].shape for k in base)
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in base)
    assert not all(torch.equal(loaded[0][k], other_seed[k]) for k in base if "norm" not in k)
    assert not all(torch.equal(loaded[0][k], base[k]) for k in base if "norm" not in k)
    tok = load_tokenizer(name)
    assert tok.get_vocab() == base_tok.get_vocab() and tok.chat_template == base_tok.chat_template


@pytest.mark.e2e
def test_base_outputs_of_another_row_are_reused_not_regenerated(full_run, tmp_path):
    """A second row with the same untrained base, prompts and greedy settings copies the first row's base
    outputs (the model is never loaded: its name here does not exist); other settings are not reused."""
    import dataclasses

    from cmerl.fingerprint import sidecar_path
    from cmerl.generation import load_prompt_items

    src_tmp, _ = full_run
    row = study.load_row("row-tiny", config_dir=src_tmp / "configs", runs_root=src_tmp / "runs")
    first = tmp_path / "results" / "row-tiny" / "outputs_base.json"
    first.parent.mkdir(parents=True)
    done = src_tmp / "results" / "row-tiny" / "outputs_base.json"
    shutil.copy(done, first)
    shutil.copy(sidecar_path(done), sidecar_path(first))
    items, gen = load_prompt_items(row.eval.prompts), study.eval_generation(row)
    second = tmp_path / "results" / "row-other" / "outputs_base.json"
    messages = []
    assert study._generate("no-such-model", items, second, gen, generator=row.eval.base, stop_after=None,
                           progress=False, reuse_from=tmp_path / "results", print_status=messages.append)
    assert second.read_bytes() == first.read_bytes()
    assert sidecar_path(second).read_bytes() == sidecar_path(first).read_bytes()
    assert any("reused" in m and "row-tiny" in m for m in messages)
    # longer answers asked for: the first row's file is not a match, so nothing is copied (and stop_after=0
    # stops before loading the model)
    longer = dataclasses.replace(gen, max_new_tokens=gen.max_new_tokens + 1)
    third = tmp_path / "results" / "row-third" / "outputs_base.json"
    assert not study._generate("no-such-model", items, third, longer, generator=row.eval.base, stop_after=0,
                               progress=False, reuse_from=tmp_path / "results")
    assert not third.exists()


def test_cli_runs_several_rows_in_order_and_stops_at_the_first_that_fails(tmp_path, models):
    from typer.testing import CliRunner

    from cmerl.cli import app

    write_row(tmp_path, models, name="row-a")
    write_row(tmp_path, models, name="row-b", learning_rate=5e-4)
    dirs = ["--config-dir", str(tmp_path / "configs"), "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results")]
    runner = CliRunner()
    out = runner.invoke(app, ["study", "run", "--all", "--phases", "train", "--budget", "train=1", *dirs])
    assert out.exit_code == 0, out.output
    assert out.output.index("== row 1/2: row-a") < out.output.index("== row 2/2: row-b")
    for name in ("row-a", "row-b"):  # each row got its one step
        assert [r["step"] for r in iter_jsonl(tmp_path / "results" / name / "metrics.jsonl")] == [1]
    bad = runner.invoke(app, ["study", "run", "row-a", "no-such-row", "row-b", "--phases", "train",
                              "--budget", "train=1", *dirs])
    assert bad.exit_code == 2
    assert "no-such-row" in bad.output and "not run: row-b" in bad.output
    assert [r["step"] for r in iter_jsonl(tmp_path / "results" / "row-a" / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in iter_jsonl(tmp_path / "results" / "row-b" / "metrics.jsonl")] == [1]
    both = runner.invoke(app, ["study", "run", "row-a", "--all", *dirs])
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.e2e
def test_row_continues_on_a_machine_without_the_weights_once_their_outputs_are_committed(tmp_path, models,
                                                                                         full_run):
    """A fresh clone holds the results folder but no ``runs/``: a row whose training and trained outputs are
    done goes on to judging without retraining; one whose trained outputs are not complete still trains."""
    write_row(tmp_path, models)
    _run(tmp_path, phases=["train", "heldout", "generate"])
    res = tmp_path / "results" / "row-tiny"
    line = next(ln for ln in study.study_table(tmp_path / "results").splitlines() if ln.startswith("| row-tiny |"))
    assert "| trained |" in line and line.endswith("| in progress: judge |"), line
    metrics_before = (res / "metrics.jsonl").read_bytes()
    shutil.rmtree(tmp_path / "runs")
    status = study.row_status("row-tiny", runs_root=tmp_path / "runs", results_root=tmp_path / "results", sync=False)
    assert status["last_logged_step"] == max(r["step"] for r in iter_jsonl(res / "metrics.jsonl")) > 0
    run = _run(tmp_path)
    assert run.complete, run.phases
    assert "weights not needed" in run.phases[0].note
    assert not (tmp_path / "runs" / "row-tiny" / "train").exists(), "must not retrain"
    assert (res / "metrics.jsonl").read_bytes() == metrics_before
    assert _snapshot(res) == _snapshot(full_run[0] / "results" / "row-tiny")
    # an incomplete trained outputs file needs the weights again: training runs (from step 0 here)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    (res / "outputs_trained.json").unlink()
    (res / "outputs_trained.json.fingerprint.json").unlink(missing_ok=True)
    run = _run(tmp_path, phases=["train"], budget={"train": 1})
    assert not run.complete and run.phases[0].phase == "train" and not run.phases[0].done
    assert (tmp_path / "runs" / "row-tiny" / "train").is_dir()
