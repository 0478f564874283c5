"""Resumable jobs refuse to mix runs (cmerl.fingerprint), and models are compared by what they are.

Reproductions of issue 10's silent wrong results: judging A vs A then A vs B into one verdicts file, B
regenerated in place, ``score`` over its own input or over another run's ``.json`` output, a generate
resume with other weights or another prompt set; and the independence guard fooled by a second name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cmerl.cli import app
from cmerl.fingerprint import (
    Fingerprint,
    RunMismatchError,
    guard_output,
    model_fingerprint,
    read_sidecar,
    same_model,
    sha256_file,
    sidecar_path,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

SMOLLM = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------- the mechanism
def test_differences_name_what_changed():
    old = Fingerprint("score", {"input": "sha256:" + "a" * 64}, {"verifier": "v", "model": {"weights": "x"}})
    new = Fingerprint("score", {"input": "sha256:" + "b" * 64}, {"verifier": "v", "model": {"weights": "y"},
                                                                  "tokens": True})
    diffs = new.differences(old)
    assert diffs == ["input 'input': sha256:aaaaaaaaaaaa… -> sha256:bbbbbbbbbbbb…",
                     "setting 'model.weights': 'x' -> 'y'", "setting 'tokens': (absent) -> True"]
    assert new.differences(Fingerprint.from_dict(new.to_dict())) == []
    with pytest.raises(RunMismatchError, match="not a cmerl fingerprint"):
        Fingerprint.from_dict({"kind": "something else"})
    with pytest.raises(ValueError):  # non-finite settings have no JSON form: refused, not written
        Fingerprint("x", settings={"t": float("nan")}).to_dict()


def test_guard_output_protocol(tmp_path):
    out = tmp_path / "out.jsonl"
    fp = Fingerprint("job", {"input": "sha256:1"}, {"k": 1})
    assert guard_output(out, fp) is False and read_sidecar(out) == fp.to_dict()  # fresh: sidecar written
    out.write_text('{"row": 1}\n')
    assert guard_output(out, fp) is True  # same run: resume
    with pytest.raises(RunMismatchError, match=r"belongs to another run \(setting 'k': 1 -> 2\)"):
        guard_output(out, Fingerprint("job", {"input": "sha256:1"}, {"k": 2}))
    sidecar_path(out).unlink()
    with pytest.raises(RunMismatchError, match="records no fingerprint"):
        guard_output(out, fp)
    sidecar_path(out).write_text("{not json")
    with pytest.raises(RunMismatchError, match="unreadable"):
        guard_output(out, fp)
    out.unlink()  # the output is gone: a stale or broken sidecar is simply replaced
    assert guard_output(out, fp) is False and read_sidecar(out) == fp.to_dict()


# --------------------------------------------------------------------------------------------- models
def test_same_model_by_what_it_is(tmp_path):
    from cmerl.models import local_folder

    assert same_model(SMOLLM, "HuggingFaceTB/SmolLM2-135M-Instruct")  # the packaged model's hub id
    assert same_model("HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct")
    assert same_model(f"packaged:{SMOLLM}", "hub:HuggingFaceTB/SmolLM2-135M-Instruct")  # identity strings
    assert same_model(SMOLLM, local_folder(SMOLLM))  # its converted cache folder
    assert not same_model(SMOLLM, "qwen2.5-coder-0.5b-instruct")
    assert not same_model(SMOLLM, "HuggingFaceTB/SmolLM2-360M-Instruct")
    assert model_fingerprint(SMOLLM)["id"] == "huggingfacetb/smollm2-135m-instruct"


def test_same_model_compares_folder_weights(tmp_path):
    from _training_helpers import tiny_random_folder

    a = tiny_random_folder(tmp_path / "a", SMOLLM, arch="llama", seed=0)
    copy = Path(shutil.copytree(a, tmp_path / "copy-of-a"))
    b = tiny_random_folder(tmp_path / "b", SMOLLM, arch="llama", seed=1)
    assert same_model(str(a), str(copy)) and not same_model(str(a), str(b))
    assert model_fingerprint(str(a))["weights"].startswith("files:")


def test_independence_guard_refuses_one_model_under_two_names(tmp_path):
    from cmerl.rewards import SelfVerificationError, check_independent
    from cmerl.training import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"policy": SMOLLM, "verifiers": ["HuggingFaceTB/SmolLM2-135M-Instruct"]}))
    with pytest.raises(ConfigError, match="is the policy model"):
        load_config(path)
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--check"])
    assert res.exit_code == 2 and "is the policy model" in res.output and "Traceback" not in res.output

    class Named:  # a scorer as the reward sees it: a name, no model object
        def __init__(self, name):
            self.name = name

    class Policy:
        class config:
            _name_or_path = f"packaged:{SMOLLM}"

    with pytest.raises(SelfVerificationError):
        check_independent(Policy(), [Named("HuggingFaceTB/SmolLM2-135M-Instruct")])
    check_independent(Policy(), [Named("qwen2.5-coder-0.5b-instruct")])  # a different model passes


@pytest.mark.parametrize("override, needle", [
    ({"learning_rate": -1}, "'learning_rate': must be a finite number > 0"),
    ({"learning_rate": 0}, "'learning_rate': must be a finite number > 0"),
    ({"temperature": 0}, "'temperature': must be a finite number > 0"),
    ({"verifiers": ["nobody-here/no-such-model-7f3a"]}, "resolves to nothing here"),
])
def test_train_check_refuses(tmp_path, override, needle):
    cfg = {"policy": SMOLLM, "verifiers": ["qwen2.5-coder-0.5b-instruct"], **override}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--check"])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "config OK" not in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------------------------- judge
def _outputs(path: Path, rows: list[tuple[str, str]], generator: str) -> Path:
    path.write_text(json.dumps([{"instruction": i, "output": o, "generator": generator} for i, o in rows]))
    return path


def test_judge_refuses_a_resume_onto_other_outputs(tmp_path, smollm_tokenizer, tiny_llama):
    """Issue 10 defect 1: A vs A then A vs B into one file reported A-vs-A verdicts as "A vs B"."""
    from cmerl.judging import DecisionRule, LocalJudge, load_pairs, read_verdicts, run_judge, verdicts_header

    a = _outputs(tmp_path / "a.json", [("Q1", "answer one"), ("Q2", "answer two"), ("Q3", "only in A")], "sys-a")
    b = _outputs(tmp_path / "b.json", [("Q1", "other one"), ("Q2", "other two")], "sys-b")
    judge, rule = LocalJudge(tiny_llama, smollm_tokenizer, name="tiny"), DecisionRule(0.0)
    out = tmp_path / "v.jsonl"

    def judge_files(x: Path, y: Path) -> list[dict]:
        pairs, _ = load_pairs(x, y)
        header = verdicts_header(judge, rule, judge.prompt, a={"path": str(x)}, b={"path": str(y)})
        return run_judge(judge, pairs, out, rule=rule, header=header)

    judge_files(a, a)
    before = out.read_bytes()
    with pytest.raises(RunMismatchError, match=r"different B outputs \(input 'b': sha256:"):
        judge_files(a, b)
    assert out.read_bytes() == before  # nothing appended
    # B regenerated in place (same path, new content) is another run too.
    out.unlink()
    judge_files(a, b)
    header, rows = read_verdicts(out)
    assert header["b"]["sha256"] == sha256_file(b) and all(len(r["pair_sha256"]) == 71 for r in rows)
    _outputs(b, [("Q1", "regenerated one"), ("Q2", "regenerated two")], "sys-b")
    with pytest.raises(RunMismatchError, match="B outputs"):
        judge_files(a, b)
    # A resume of the same run keeps every verdict and judges nothing new.
    _outputs(b, [("Q1", "other one"), ("Q2", "other two")], "sys-b")
    assert [r["index"] for r in judge_files(a, b)] == [0, 1]


def test_judge_refuses_a_row_judged_on_other_outputs(tmp_path, smollm_tokenizer, tiny_llama):
    """Without files to hash (pairs built in code), each verdict row's pair hash still guards the resume."""
    from cmerl.judging import DecisionRule, LocalJudge, Pair, run_judge, verdicts_header

    judge, rule = LocalJudge(tiny_llama, smollm_tokenizer, name="tiny"), DecisionRule(0.0)
    header = verdicts_header(judge, rule, judge.prompt, a={}, b={})
    out = tmp_path / "v.jsonl"
    run_judge(judge, [Pair(0, "Q", "x", "y")], out, rule=rule, header=header)
    with pytest.raises(RunMismatchError, match="judged on other outputs"):
        run_judge(judge, [Pair(0, "Q", "x", "changed")], out, rule=rule, header=header)


# --------------------------------------------------------------------------------------------- score
@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    from _server_helpers import save_tiny_verifier

    return save_tiny_verifier(tmp_path_factory.mktemp("fp-verifier"))


def _score(verifier: Path, inp: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["score", "--verifier", str(verifier), "--input", str(inp), "--output", str(out),
                                    "--dtype", "float32", *extra])


def test_score_never_writes_over_its_input(tmp_path, verifier_dir):
    """Issue 10 defect 2: ``-i rows.json -o rows.json`` rewrote the input with only the good rows."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "Q?", "response": "A."}, {"prompt": "no response"}]))
    before = rows.read_bytes()
    for out in (rows, tmp_path / "." / "rows.json"):
        res = _score(verifier_dir, rows, out)
        assert res.exit_code == 2 and "refusing to write over the input" in res.output
    link = tmp_path / "link.json"
    link.symlink_to(rows)
    assert _score(verifier_dir, rows, link).exit_code == 2
    assert rows.read_bytes() == before and not sidecar_path(rows).exists()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_score_refuses_another_runs_output_in_every_format(tmp_path, verifier_dir, suffix):
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"prompt": "Q1?", "response": "A1."}) + "\n")
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"prompt": "Q2?", "response": "A2."}) + "\n")
    out = tmp_path / f"scores{suffix}"
    assert _score(verifier_dir, first, out).exit_code == 0
    before = out.read_bytes()
    res = _score(verifier_dir, second, out)  # another input onto a finished output
    assert res.exit_code == 2 and "belongs to another run" in res.output and "input 'input'" in res.output
    res = _score(verifier_dir, first, out, "--entropy")  # same input, other options
    assert res.exit_code == 2 and "setting 'entropy': False -> True" in res.output
    assert out.read_bytes() == before
    res = _score(verifier_dir, first, out)  # the same run again: resumes (nothing to do) and keeps the rows
    assert res.exit_code == 0 and "resuming: 1 of 1" in res.output
    assert [r["cme"] for r in _read(out)] == [r["cme"] for r in _read_bytes(before, suffix)]
    sidecar_path(out).unlink()  # an output with no fingerprint (another tool, an older cmerl) is refused
    res = _score(verifier_dir, first, out)
    assert res.exit_code == 2 and "records no fingerprint" in res.output


def test_score_refuses_a_verifier_whose_weights_changed(tmp_path, verifier_dir):
    from _server_helpers import save_tiny_verifier

    verifier = Path(shutil.copytree(verifier_dir, tmp_path / "verifier"))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Q?", "response": "A."}) + "\n")
    out = tmp_path / "out.jsonl"
    assert _score(verifier, inp, out).exit_code == 0
    shutil.rmtree(verifier)
    save_tiny_verifier(verifier, seed=7)  # retrained in place: same name, other weights
    res = _score(verifier, inp, out)
    assert res.exit_code == 2 and "setting 'model.weights'" in res.output


# --------------------------------------------------------------------------------------------- generate
def test_generate_refuses_other_weights_or_another_prompt_set(tmp_path, smollm_tokenizer, tiny_llama):
    from cmerl.generation import GenerationConfig, PromptItem, generate_outputs, outputs_complete

    out = tmp_path / "o.json"
    cfg = GenerationConfig(max_new_tokens=3, batch_size=2, dtype="float32")
    items = [PromptItem(0, "Say hi."), PromptItem(1, "Count to two.")]
    weights_1, weights_2 = {"id": None, "weights": "files:1"}, {"id": None, "weights": "files:2"}
    generate_outputs(tiny_llama, smollm_tokenizer, items, out, generator="g", config=cfg, model_fingerprint=weights_1)
    assert json.loads(out.read_text())[0]["instruction"] == "Say hi."  # AlpacaEval format kept: a plain list
    assert read_sidecar(out)["settings"]["model"] == weights_1
    assert outputs_complete(out, items, generator="g", config=cfg, model_fingerprint=weights_1)
    assert not outputs_complete(out, items, generator="g", config=cfg, model_fingerprint=weights_2)
    before = out.read_bytes()
    with pytest.raises(RunMismatchError, match="setting 'model.weights': 'files:1' -> 'files:2'"):
        generate_outputs(tiny_llama, smollm_tokenizer, items, out, generator="g", config=cfg,
                         model_fingerprint=weights_2)
    with pytest.raises(RunMismatchError, match="answers another instruction"):
        generate_outputs(tiny_llama, smollm_tokenizer, [PromptItem(0, "Something else.")], out, generator="g",
                         config=cfg, model_fingerprint=weights_1)
    assert out.read_bytes() == before


def _read(path: Path) -> list[dict]:
    return _read_bytes(path.read_bytes(), path.suffix)


def _read_bytes(data: bytes, suffix: str) -> list[dict]:
    text = data.decode()
    return json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines()]
