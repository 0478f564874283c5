"""The evaluation commands end to end on tiny model folders: generate → judge → winrate → report, the
one-command ``eval``, ``judge-check`` (agreement recomputed by hand), ``reward-check`` (accuracies
recomputed from the verifier's scores), an endpoint judge over HTTP, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from _eval_helpers import (
    JudgeServer,
    save_tiny_model,
    single_thread,  # noqa: F401  (fixture, used via pytestmark)
    write_outputs,
)
from typer.testing import CliRunner

from cmerl.checks import load_reference_pairs
from cmerl.cli import app
from cmerl.judging import read_verdicts

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see _eval_helpers


def invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"a": save_tiny_model(root / "policy-a", seed=0), "b": save_tiny_model(root / "policy-b", seed=2),
            "judge": save_tiny_model(root / "judge", seed=3)}


def test_generate_judge_winrate_report(tmp_path, tiny_dirs):
    gen = ["--prompts", "alpaca_eval:3", "--max-new-tokens", "6", "--dtype", "float32"]
    for name in ("a", "b"):
        res = invoke("generate", "--model", tiny_dirs[name], "--output", tmp_path / f"outputs_{name}.json",
                     "--generator", f"sys-{name}", *gen)
        assert res.exit_code == 0, res.output
    rows_a = json.loads((tmp_path / "outputs_a.json").read_text())
    assert [r["generator"] for r in rows_a] == ["sys-a"] * 3
    judge = ["--a", tmp_path / "outputs_a.json", "--b", tmp_path / "outputs_b.json", "--judge", tiny_dirs["judge"],
             "--judge-dtype", "float32", "--output", tmp_path / "verdicts.jsonl"]
    res = invoke("judge", *judge, "--limit", "1")  # an interrupted run ...
    assert res.exit_code == 0, res.output
    assert len(read_verdicts(tmp_path / "verdicts.jsonl")[1]) == 1
    res = invoke("judge", *judge)  # ... continues
    assert res.exit_code == 0, res.output
    header, rows = read_verdicts(tmp_path / "verdicts.jsonl")
    assert len(rows) == 3 and header["a"]["generator"] == "sys-a" and header["b"]["generator"] == "sys-b"
    res = invoke("winrate", tmp_path / "verdicts.jsonl", "--json", tmp_path / "winrate.json")
    assert res.exit_code == 0, res.output
    w = json.loads((tmp_path / "winrate.json").read_text())["winrate"]
    verdicts = [r["verdict"] for r in rows]
    assert (w["wins"], w["ties"], w["losses"]) == (verdicts.count("a"), verdicts.count("tie"), verdicts.count("b"))
    assert w["win_rate"] == pytest.approx((verdicts.count("a") + verdicts.count("tie") / 2) / 3)
    assert "win rate of A (ties count half)" in res.output and "not measured" in res.output
    res = invoke("report", tmp_path)
    assert res.exit_code == 0, res.output
    text = (tmp_path / "report.md").read_text()
    assert "sys-a (A) vs sys-b (B)" in text and "`outputs_a.json` | sys-a | 3 |" in text
    assert (tmp_path / "figures" / "verdicts_winrate.png").is_file()


def test_eval_one_command_and_rerun(tmp_path, tiny_dirs):
    run = tmp_path / "run"
    shutil.copytree(tiny_dirs["a"], run / "final")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": -3 + s / 2,
                                                           "completions/mean_length": 20 - s}) + "\n"
                                               for s in range(1, 5)))
    out = tmp_path / "results"
    args = ["eval", "--trained", run, "--base", tiny_dirs["b"], "--judge", tiny_dirs["judge"], "--judge-dtype",
            "float32", "--prompts", "alpaca_eval[10:13]", "--output-dir", out, "--max-new-tokens", "6",
            "--dtype", "float32"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    for name in ("outputs_trained.json", "outputs_base.json", "verdicts.jsonl", "winrate.json", "report.md",
                 "figures/training_curves.png", "figures/verdicts_winrate.png", "figures/verdicts_lengths.png"):
        assert (out / name).is_file(), name
    trained = json.loads((out / "outputs_trained.json").read_text())
    assert [r["index"] for r in trained] == [10, 11, 12] and trained[0]["generator"] == "run"
    assert "## Training" in (out / "report.md").read_text()
    stamps = {p: (out / p).stat().st_mtime_ns for p in ("outputs_trained.json", "outputs_base.json")}
    lines = (out / "verdicts.jsonl").read_text()
    res = invoke(*args)  # everything is already there: nothing is regenerated or rejudged
    assert res.exit_code == 0, res.output
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "verdicts.jsonl").read_text() == lines


def test_judge_check_agreement_by_hand(tmp_path, tiny_dirs, tmp_cache):
    out = tmp_path / "jc"
    res = invoke("judge-check", "--judge", tiny_dirs["judge"], "--judge-dtype", "float32", "--n", "6",
                 "--output-dir", out)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "judge_check.json").read_text())
    _, rows = read_verdicts(out / "verdicts.jsonl")
    refs = load_reference_pairs(n=6)
    assert [r["index"] for r in rows] == [ref.pair.index for ref in refs]
    score = []
    for ref, row in zip(refs, rows):
        reference = "a" if ref.preference < 1.5 else "b"
        score.append(1.0 if row["verdict"] == reference else 0.5 if row["verdict"] == "tie" else 0.0)
    assert result["n"] == 6 and result["agreement"]["value"] == pytest.approx(sum(score) / 6)
    longer = [1.0 if (len(ref.pair.output_a) > len(ref.pair.output_b)) == (ref.preference < 1.5) else 0.0
              for ref in refs]
    assert result["length_baseline"]["value"] == pytest.approx(sum(longer) / 6)
    registry = json.loads((tmp_cache / "judge_checks.json").read_text())
    assert registry[result["key"]]["agreement"] == result["agreement"]["value"]
    # A later win rate by the same judge setup states this agreement.
    a = write_outputs(tmp_path / "a.json", [("Say hi.", "Hello!"), ("2+2?", "4")], "x")
    b = write_outputs(tmp_path / "b.json", [("Say hi.", "Bye."), ("2+2?", "5")], "y")
    res = invoke("judge", "--a", a, "--b", b, "--judge", tiny_dirs["judge"], "--judge-dtype", "float32",
                 "--output", tmp_path / "v.jsonl")
    assert res.exit_code == 0, res.output
    assert f"agreement with GPT-4 Turbo {100 * result['agreement']['value']:.1f}%" in res.output


def test_judge_prefix_reuse_flag_reaches_the_local_judge_and_keeps_the_verdicts(tmp_path, tiny_dirs, monkeypatch):
    """``cmerl judge --prefix-reuse`` builds the local judge with prefix reuse (its shared-prefix cache is
    built) and writes the same verdicts as the plain run, margins equal up to float rounding."""
    from cmerl.judging import LocalJudge

    built: list[LocalJudge] = []
    plain_init = LocalJudge.__init__

    def recording_init(self, *args, **kwargs):
        plain_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(LocalJudge, "__init__", recording_init)
    rows_a = [("Name a colour.", "Blue."), ("2+2?", "4, because two and two make four."), ("Say hi.", "Hi!")]
    rows_b = [("Name a colour.", "No idea."), ("2+2?", "5"), ("Say hi.", "Hello there, how are you?")]
    a, b = write_outputs(tmp_path / "a.json", rows_a, "x"), write_outputs(tmp_path / "b.json", rows_b, "y")
    verdicts = {}
    for flag in ("--no-prefix-reuse", "--prefix-reuse"):
        out = tmp_path / f"v{flag}.jsonl"
        res = invoke("judge", "--a", a, "--b", b, "--judge", tiny_dirs["judge"], "--judge-dtype", "float32",
                     "--output", out, flag)
        assert res.exit_code == 0, res.output
        verdicts[flag] = read_verdicts(out)[1]
    assert [j.prefix_reuse for j in built] == [False, True]
    assert built[0].prefix_forwards == 0 and built[1].prefix_forwards >= 1
    plain, reuse = verdicts["--no-prefix-reuse"], verdicts["--prefix-reuse"]
    assert [r["verdict"] for r in plain] == [r["verdict"] for r in reuse] and len(plain) == 3
    assert [r["margin"] for r in reuse] == pytest.approx([r["margin"] for r in plain], abs=1e-4)


def test_reward_check_by_hand(tmp_path, tiny_dirs):
    from cmerl.models import load_model
    from cmerl.scoring import Verifier

    rows = [{"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "No."},        # longer chosen
            {"prompt": "2+2?", "chosen": "2 + 2 = 4, since two and two make four.", "rejected": "5"},  # longer
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hello, how are you today?"},         # shorter
            {"prompt": "Pick A or B.", "chosen": "A", "rejected": "B"}]                              # equal
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("reward-check", "--verifier", tiny_dirs["judge"], "--data", data, "--dtype", "float32",
                 "--output", tmp_path / "rc.json")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "rc.json").read_text())
    assert result["length_baseline"]["value"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    model, tok = load_model(str(tiny_dirs["judge"]), dtype="float32")
    v = Verifier(model, tok)
    ch = v.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], entropy=True)
    rj = v.score([r["prompt"] for r in rows], [r["rejected"] for r in rows], entropy=True)
    for name, get in (("mean_logprob", lambda s: s.mean_logprob), ("sum_logprob", lambda s: s.sum_logprob),
                      ("neg_entropy", lambda s: -s.mean_entropy)):
        wins = [1.0 if get(c) > get(r) else 0.5 if get(c) == get(r) else 0.0 for c, r in zip(ch, rj)]
        assert result["signals"][name]["accuracy"]["value"] == pytest.approx(sum(wins) / 4), name
    assert "length only (longer wins) | 62.5%" in res.output


def test_off_topic_reward_check(tmp_path, tiny_dirs):
    """--rejected off-topic: each prompt's chosen answer against another prompt's chosen answer."""
    from cmerl.checks import PreferencePair, RewardCheckResult, off_topic_pairs

    pairs = [PreferencePair(f"q{i}", f"answer {i}", f"bad {i}") for i in range(7)]
    swapped = off_topic_pairs(pairs, seed=3)
    assert [p.prompt for p in swapped] == [p.prompt for p in pairs]
    assert [p.chosen for p in swapped] == [p.chosen for p in pairs]
    others = [int(p.rejected.split()[1]) for p in swapped]
    assert sorted(others) == list(range(7)) and all(o != i for i, o in enumerate(others))  # a derangement
    assert off_topic_pairs(pairs, seed=3) == swapped and off_topic_pairs(pairs, seed=4) != swapped
    with pytest.raises(ValueError, match="at least 2 pairs"):
        off_topic_pairs(pairs[:1])

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    res = invoke("reward-check", "--verifier", tiny_dirs["judge"], "--data", data, "--rejected", "off-topic",
                 "--dtype", "float32", "--output", tmp_path / "rc.json")
    assert res.exit_code == 0, res.output
    assert "each answer against another prompt's" in res.output and "prefers chosen over an off-topic" in res.output
    result = RewardCheckResult.from_dict(json.loads((tmp_path / "rc.json").read_text()))
    assert result.rejected == "off-topic" and result.n == 7
    # all answers have the same shape, so the length baseline ties everywhere
    assert result.length_baseline.value == pytest.approx(0.5)
    assert RewardCheckResult.from_dict(result.to_dict()) == result
    res = invoke("reward-check", "--verifier", tiny_dirs["judge"], "--data", data, "--rejected", "nonsense")
    assert res.exit_code == 1 and "--rejected must be one of data, off-topic" in res.output


def test_judge_cli_against_http_endpoint(tmp_path):
    server = JudgeServer()
    try:
        a = write_outputs(tmp_path / "a.json", [("q1", "GOOD GOOD"), ("q2", "meh"), ("q3", "GOOD")], "x")
        b = write_outputs(tmp_path / "b.json", [("q1", "meh"), ("q2", "GOOD"), ("q3", "GOOD")], "y")
        res = invoke("judge", "--a", a, "--b", b, "--judge", "rules", "--judge-url", server.base_url,
                     "--judge-api", "completions", "--output", tmp_path / "v.jsonl")
        assert res.exit_code == 0, res.output
        header, rows = read_verdicts(tmp_path / "v.jsonl")
        assert [r["verdict"] for r in rows] == ["a", "b", "tie"]
        assert header["judge"]["settings"]["base_url"] == server.base_url
        assert "wins 1 / ties 1 / losses 1" in res.output
        assert server.stats()["/v1/completions"] == 6
    finally:
        server.stop()


def test_bad_input_is_reported(tmp_path, tiny_dirs):
    a = write_outputs(tmp_path / "a.json", [("q1", "x")], "x")
    b = write_outputs(tmp_path / "b.json", [("other", "y")], "y")
    res = invoke("judge", "--a", a, "--b", b, "--judge", tiny_dirs["judge"], "--output", tmp_path / "v.jsonl")
    assert res.exit_code == 1 and "share no instruction" in res.output
    res = invoke("generate", "--model", tiny_dirs["a"], "--prompts", "nope", "--output", tmp_path / "o.json")
    assert res.exit_code == 1 and "neither a bundled set" in res.output
    res = invoke("winrate", a)
    assert res.exit_code == 1 and "has no cmerl verdicts header" in res.output
    res = invoke("reward-check", "--verifier", tiny_dirs["judge"], "--data", a)
    assert res.exit_code == 1 and "needs 'prompt', 'chosen' and 'rejected'" in res.output
    res = invoke("winrate", tmp_path / "missing.jsonl")
    assert res.exit_code == 1 and "verdicts file not found" in res.output
    (tmp_path / "not-a-model").mkdir()  # a folder without config.json: an unusable model name
    res = invoke("reward-check", "--verifier", tmp_path / "not-a-model", "--n", "2")
    assert res.exit_code == 1 and "holds no config.json" in res.output and "Traceback" not in res.output
    res = invoke("generate", "--model", tmp_path / "not-a-model", "--prompts", "alpaca_eval:1",
                 "--output", tmp_path / "o.json")
    assert res.exit_code == 1 and "holds no model" in res.output
