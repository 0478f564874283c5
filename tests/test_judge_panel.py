"""Several judges in one run, the Anthropic Messages API judge (against a real HTTP server), and the other
judge modes: reference-guided, pointwise rubric, ensemble (live and replayed from verdicts files)."""

from __future__ import annotations

import json

import pytest
import torch
from _anthropic_server import KEY, AnthropicServer
from _eval_helpers import (  # noqa: F401
    JudgeServer,
    quality,
    single_thread,
    write_outputs,
)
from typer.testing import CliRunner

from cmerl.anthropic_judge import AnthropicJudge
from cmerl.cli import app
from cmerl.judge_modes import (
    EnsembleJudge,
    PointwiseJudge,
    ReferencePrompt,
    ReplayJudge,
    combine_orders,
    parse_judge_name,
)
from cmerl.judging import (
    DecisionRule,
    Job,
    JudgeConnectionError,
    JudgePrompt,
    LocalJudge,
    OrderResult,
    Pair,
    judge_key,
    judge_pairs,
    read_verdicts,
    run_judge,
    verdicts_header,
)

pytestmark = pytest.mark.usefixtures("single_thread")

GOOD_PAIRS = [Pair(0, "Q0", "GOOD GOOD answer", "plain answer"), Pair(1, "Q1", "plain", "GOOD answer"),
              Pair(2, "Q2", "same", "same"), Pair(3, "Q3", "GOOD", "GOOD GOOD GOOD")]


def _expected(p: Pair) -> str:
    d = quality(p.output_a) - quality(p.output_b)
    return "a" if d > 0 else "b" if d < 0 else "tie"


@pytest.fixture(scope="module")
def anthropic_server():
    server = AnthropicServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_server():
    server = JudgeServer()
    yield server
    server.stop()


# --------------------------------------------------------------------------- Anthropic judge
@pytest.mark.parametrize("prefill", [False, True])
def test_anthropic_judge_against_a_messages_api_server(anthropic_server, monkeypatch, prefill):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    judge = AnthropicJudge("claude-rules", base_url=anthropic_server.base_url, api_key_env="TEST_ANTHROPIC_KEY",
                           prefill=prefill, concurrency=2)
    before = anthropic_server.stats().get("claude-rules", 0)
    rows = judge_pairs(judge, GOOD_PAIRS)
    assert anthropic_server.stats()["claude-rules"] - before == 2 * len(GOOD_PAIRS)
    assert [r["verdict"] for r in rows] == [_expected(p) for p in GOOD_PAIRS]
    assert rows[2]["consistent"] is False  # equal answers: the server says A in both orders -> a tie
    assert all(r["margin"] is None for r in rows)  # parse mode: no log-probs
    assert judge.settings()["kind"] == "anthropic" and KEY not in json.dumps(judge.settings())
    judge.close()


def test_anthropic_judge_errors(anthropic_server, monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    garbage = AnthropicJudge("claude-garbage", base_url=anthropic_server.base_url, api_key_env="TEST_ANTHROPIC_KEY")
    rows = judge_pairs(garbage, GOOD_PAIRS[:1])
    assert rows[0]["verdict"] == "error" and rows[0]["orders"]["ab"]["attempts"] == 2  # retried, never a tie
    missing = AnthropicJudge("claude-nope", base_url=anthropic_server.base_url, api_key_env="TEST_ANTHROPIC_KEY",
                             retries=0)
    with pytest.raises(JudgeConnectionError, match="HTTP 404"):
        missing.judge([Job("q", "a", "b")])
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "wrong")
    wrong = AnthropicJudge("claude-rules", base_url=anthropic_server.base_url, api_key_env="TEST_ANTHROPIC_KEY",
                           retries=0)
    with pytest.raises(JudgeConnectionError, match="HTTP 401"):
        wrong.judge([Job("q", "a", "b")])
    monkeypatch.delenv("TEST_ANTHROPIC_KEY")
    with pytest.raises(ValueError, match="TEST_ANTHROPIC_KEY"):
        AnthropicJudge("claude-rules", base_url=anthropic_server.base_url, api_key_env="TEST_ANTHROPIC_KEY")


# --------------------------------------------------------------------------- several judges
def test_several_judges_per_judge_numbers_mean_and_a_failing_judge(tmp_path, openai_server, anthropic_server,
                                                                   monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    rows_a = [("q1", "GOOD GOOD"), ("q2", "GOOD"), ("q3", "meh"), ("q4", "GOOD x")]
    rows_b = [("q1", "meh"), ("q2", "meh"), ("q3", "GOOD"), ("q4", "GOOD y")]
    a = write_outputs(tmp_path / "a.json", rows_a, "sys-a")
    b = write_outputs(tmp_path / "b.json", rows_b, "sys-b")
    judges = [f"openai:rules@{openai_server.base_url}", f"anthropic:claude-rules@{anthropic_server.base_url}",
              f"anthropic:claude-garbage@{anthropic_server.base_url}", f"openai:no-such-model@{openai_server.base_url}"]
    args = ["judge", "--a", str(a), "--b", str(b), "--output", str(tmp_path / "v.jsonl"),
            "--api-key-env", "TEST_ANTHROPIC_KEY", "--concurrency", "2"]
    for j in judges:
        args += ["--judge", j]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output  # a judge failed: reported, and the command says so
    panel = json.loads((tmp_path / "v.panel.json").read_text())
    members = {m["name"]: m for m in panel["members"]}
    # by the rule: a wins q1 and q2, loses q3, ties q4 -> (2 + 0.5) / 4 for both working judges
    expected = (2 + 0.5) / 4
    for name in judges[:2]:
        _, rows = read_verdicts(members[name]["verdicts"])
        assert [r["verdict"] for r in rows] == ["a", "a", "b", "tie"]
        assert members[name]["summary"]["winrate"]["win_rate"] == pytest.approx(expected)
    garbage = members[judges[2]]["summary"]["winrate"]
    assert garbage["n"] == 0 and garbage["errors"] == 4 and garbage["ties"] == 0  # errors, never ties
    assert "404" in members[judges[3]]["error"]
    assert panel["n_ok"] == 2 and panel["mean_win_rate"] == pytest.approx(expected)
    assert "FAILED" in res.output and "mean over 2 of 4 judges: win rate 62.5%" in res.output
    assert "no judged pairs (4 errors)" in res.output
    assert res.output.count("agreement with GPT-4 Turbo not measured") == 2  # printed beside each judge's numbers


def test_judge_names():
    assert parse_judge_name("qwen") == ("local", "qwen", None)
    assert parse_judge_name("openai:m@http://h/v1") == ("openai", "m", "http://h/v1")
    assert parse_judge_name("anthropic:claude-x") == ("anthropic", "claude-x", None)
    assert parse_judge_name("ensemble:a+b") == ("ensemble", "a+b", None)
    for bad in ("ensemble:a", "openai:m", "anthropic:"):
        with pytest.raises(ValueError):
            parse_judge_name(bad)


# --------------------------------------------------------------------------- reference-guided
def test_reference_prompt_shows_the_bundled_gpt4_answer():
    prompt = ReferencePrompt.build()
    instr = next(iter(prompt.references))
    msg = prompt.user_message(instr, "x {reference}", "y")
    assert prompt.references[instr][:200] in msg and "x {reference}" in msg  # one pass: braces stay literal
    assert prompt.sha256 != JudgePrompt.load().sha256 and prompt.to_dict()["references"]["sha256"]
    with pytest.raises(ValueError, match="no reference answer"):
        prompt.user_message("an instruction that is not in AlpacaEval", "x", "y")


# --------------------------------------------------------------------------- pointwise
class CountingPointwise(PointwiseJudge):
    contexts = 0

    def next_token_logprobs(self, contexts):
        type(self).contexts += len(contexts)
        return super().next_token_logprobs(contexts)


def test_pointwise_judge_scores_each_answer_once(smollm_tokenizer, tiny_llama):
    judge = CountingPointwise(tiny_llama, smollm_tokenizer, name="tiny-pointwise")
    pairs = [Pair(0, "Say hi.", "hi", "Hello there!"), Pair(1, "2+2?", "4", "5")]
    rows = judge_pairs(judge, pairs, DecisionRule(0.0))
    assert CountingPointwise.contexts == 4  # 2 pairs x 2 answers, both orders reuse them
    for p, r in zip(pairs, rows):
        scores = []
        for resp in (p.output_a, p.output_b):
            ids, digits = judge.encode_response(p.instruction, resp)
            with torch.no_grad():
                logits = tiny_llama(torch.tensor([ids])).logits[0, -1].double()
            probs = torch.softmax(torch.log_softmax(logits, -1)[list(digits)], -1)
            scores.append(float((probs * torch.arange(1, 10, dtype=torch.float64)).sum()))
        assert r["orders"]["ab"]["extra"]["score_A"] == pytest.approx(scores[0], abs=1e-4)
        assert r["margin"] == pytest.approx(2 * (scores[0] - scores[1]), abs=1e-4)
        assert r["verdict"] == ("a" if scores[0] > scores[1] else "b")
    assert [smollm_tokenizer.decode([i]) for i in digits] == [str(d) for d in range(1, 10)]
    assert judge.settings()["mode"] == "pointwise"


# --------------------------------------------------------------------------- ensemble
def test_combine_orders():
    r = combine_orders([OrderResult("A", -0.1, -2.1), OrderResult("B", -1.0, -0.5), OrderResult("B")])
    assert r.logprob_A - r.logprob_B == pytest.approx((2.0 - 0.5 - 1.0) / 3)
    err = combine_orders([OrderResult("A", -0.1, -2.1), OrderResult(None, error="boom")], ["j1", "j2"])
    assert err.choice is None and "j2" in err.error and "boom" in err.error


def test_ensemble_live_equals_replayed(tmp_path, smollm_tokenizer, tiny_llama, tiny_qwen, qwen_tokenizer):
    members = [LocalJudge(tiny_llama, smollm_tokenizer, name="tiny-l"), LocalJudge(tiny_qwen, qwen_tokenizer,
                                                                                   name="tiny-q")]
    pairs = [Pair(0, "Say hi.", "hi", "Hello there!"), Pair(1, "2+2?", "4", "5"), Pair(2, "Q", "x", "y y")]
    rule = DecisionRule(0.0)
    files = []
    for m in members:
        path = tmp_path / f"{m.name}.jsonl"
        run_judge(m, pairs, path, rule=rule, header=verdicts_header(m, rule, m.prompt, a={}, b={}))
        files.append(path)
    live = EnsembleJudge(members)
    live_rows = judge_pairs(live, pairs, rule)
    for p, r in zip(pairs, live_rows):
        ab = [m.judge([Job(p.instruction, p.output_a, p.output_b)])[0] for m in members]
        assert r["orders"]["ab"]["logprob_A"] - r["orders"]["ab"]["logprob_B"] == pytest.approx(
            sum(x.logprob_A - x.logprob_B for x in ab) / 2, abs=1e-5)
    replay = EnsembleJudge([ReplayJudge(f, pairs) for f in files])
    replay_rows = judge_pairs(replay, pairs, rule)
    assert [r["verdict"] for r in replay_rows] == [r["verdict"] for r in live_rows]
    assert [r["margin"] for r in replay_rows] == pytest.approx([r["margin"] for r in live_rows], abs=1e-6)
    h_live = verdicts_header(live, rule, live.prompt, a={}, b={})
    h_replay = verdicts_header(replay, rule, replay.prompt, a={}, b={})
    assert judge_key(h_live) == judge_key(h_replay)  # a replayed measurement is credited to the live setup
    partial = EnsembleJudge([ReplayJudge(files[0], pairs[:1]), ReplayJudge(files[1], pairs)])
    assert [r["verdict"] for r in judge_pairs(partial, pairs, rule)][1:] == ["error", "error"]
