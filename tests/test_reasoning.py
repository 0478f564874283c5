"""Reasoning mode: answer spans, grading, AUROC, problem sets, the cme_answer / correctness rewards, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cmerl.answers import find_answer, find_boxed, find_gsm8k, token_indices_in_span
from cmerl.grading import grade
from cmerl.metrics import auroc, auroc_interval, pass_at_k

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ answer spans
@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),                      # nested braces
    ("\\boxed{1} then \\boxed{ 2 } end", "2"),                           # several boxes: the last wins
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                               # escaped braces do not nest
    ("\\boxed{7} and \\boxed{8", "7"),                                   # an unclosed box is ignored
    ("\\boxed{5} then \\boxed{  }", "5"),                                # a blank box is no answer
    ("\\fbox{x^{2}}", "x^{2}"),
    ("no answer at all", None),
    ("", None),
])
def test_boxed_spans(text, expected):
    span = find_boxed(text)
    assert (span.text if span else None) == expected
    if span:
        assert text[span.start:span.end] == span.text


@pytest.mark.parametrize("text, expected", [
    ("She earns 9 * 2 = 18.\n#### 18", "18"),
    ("#### 1,234,567.", "1,234,567"),                                   # commas kept in the span, dot dropped
    ("#### $1,000", "1,000"),
    ("#### -3.5\n", "-3.5"),
    ("#### 2\nwait\n#### 4", "4"),                                      # the last #### wins
    ("#### 18, since", "18"),
    ("#### none", None),
])
def test_gsm8k_spans(text, expected):
    span = find_gsm8k(text)
    assert (span.text if span else None) == expected
    if span:
        assert text[span.start:span.end] == span.text


def test_auto_takes_the_answer_that_ends_last_and_checks_the_format():
    assert find_answer("\\boxed{3}\n#### 4", "auto").text == "4"
    assert find_answer("#### 4 so \\boxed{3}", "auto").text == "3"
    assert find_answer("#### 4 so \\boxed{3}", "gsm8k").text == "4"
    with pytest.raises(ValueError, match="unknown answer format 'latex'"):
        find_answer("x", "latex")


def test_token_indices_in_span_uses_overlap_and_skips_zero_width_tokens():
    offsets = [(0, 3), (3, 8), (8, 10), (10, 12), (12, 12)]  # "so \boxed{18}" roughly; last = special token
    assert token_indices_in_span(offsets, 9, 11) == [2, 3]
    assert token_indices_in_span(offsets, 12, 12) == []
    assert token_indices_in_span(offsets, 0, 1) == [0]


# ----------------------------------------------------------------------------------------------- grading
@pytest.mark.parametrize("solution, gold, correct", [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("#### 1,234", "1234", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", True),
    ("\\boxed{q - p}", "p - q", False),
    ("\\boxed{3}", "4", False),
    ("the answer is 4", "4", False),                                    # no final answer: wrong
])
def test_grade(solution, gold, correct):
    g = grade(solution, gold)
    assert g.correct is correct
    assert (g.extracted is None) == (solution == "the answer is 4")


# ----------------------------------------------------------------------------------------------- metrics
def test_auroc_matches_a_hand_computed_case_with_ties():
    # positives 3, 2, 2 vs negatives 2, 1: of 6 pairs, 4 are won and 2 tied -> (4 + 2 * 0.5) / 6
    assert auroc([3, 2, 2, 2, 1], [True, True, True, False, False]) == pytest.approx(5 / 6)
    # the direction: correct scored lower -> below 0.5
    assert auroc([0, 1], [True, False]) == 0.0
    assert auroc([1, 1, 1], [True, False, True]) == 0.5
    assert auroc([1, 2], [True, True]) is None
    with pytest.raises(ValueError, match="score 1 is NaN"):
        auroc([1, float("nan")], [True, False])


def test_auroc_interval_resamples_groups_and_is_reproducible():
    scores = [3, 2, 2, 2, 1, 0]
    labels = [True, True, True, False, False, False]
    a = auroc_interval(scores, labels, [0, 0, 1, 1, 2, 2], n_boot=300, seed=1)
    b = auroc_interval(scores, labels, [0, 0, 1, 1, 2, 2], n_boot=300, seed=1)
    assert a == b and a.n_groups == 3 and a.n_pos == 3 and a.n_neg == 3
    assert a.ci_low <= a.value <= a.ci_high
    assert auroc_interval([1, 2], [True, True]).value is None


def test_pass_at_k():
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


# ------------------------------------------------------------------------------------------ problem sets
def test_bundled_problem_sets_and_slices():
    from cmerl.problems import ANSWER_INSTRUCTION, ProblemDataError, load_problems

    g = load_problems("gsm8k:3")
    assert [p.answer for p in g] == ["18", "3", "70000"] and g[0].prompt.endswith(ANSWER_INSTRUCTION)
    assert len(load_problems("gsm8k")) == 1319 and len(load_problems("gsm8k_train")) == 7473
    m = load_problems("math500[10:12]")
    assert [p.index for p in m] == [10, 11] and m[1].answer == "\\frac{3}{56}" and m[0].id
    # every MATH-500 reference solution boxes exactly the gold answer
    assert all(find_boxed(p.solution).text == p.answer for p in load_problems("math500"))
    with pytest.raises(ProblemDataError, match="unknown problem set 'gsm9k'"):
        load_problems("gsm9k:3")


def test_hub_problem_set_offline_fails_fast(monkeypatch):
    from cmerl.problems import ProblemDataError, load_problems

    monkeypatch.setattr("cmerl.models.hub_reachable", lambda: False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    with pytest.raises(ProblemDataError, match="unreachable"):
        load_problems("openai/gsm8k:5")


def test_training_prompt_set_carries_gold_answers(smollm_tokenizer):
    from cmerl.data import load_prompt_set, to_dataset

    ps = load_prompt_set("gsm8k_train", smollm_tokenizer, max_prompt_length=160, max_prompts=5)
    assert len(ps.prompts) == len(ps.answers) == 5
    ds = to_dataset(ps, smollm_tokenizer)
    assert ds.column_names == ["prompt", "raw_prompt", "answer"] and ds[0]["answer"] == "72"


def test_answer_column_of_a_prompt_file(tmp_path):
    import json

    from cmerl.data import PromptDataError, read_answers

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "gold": 2}) + "\n" + json.dumps({"prompt": "2+2?", "gold": "4"}) + "\n")
    assert read_answers(str(path), column="gold") == ["2", "4"] and read_answers(str(path)) is None
    with pytest.raises(PromptDataError, match="row 1: missing answer column 'answer'"):
        read_answers(str(path), column="answer")


# ------------------------------------------------------------------------------------------------ rewards
def test_answer_span_reward_formula_on_a_real_tokenizer(tiny_qwen_verifier):
    from cmerl.math_rewards import LOGPROB_FLOOR, AnswerSpanCME, answer_span_score

    prompt = "What is 12 + 6?"
    responses = ["12 + 6 = 18, so the answer is \\boxed{18}.", "I do not know.", "#### 1,018"]
    scores = tiny_qwen_verifier.score([prompt] * 3, responses, entropy=True)
    s = scores[0]
    span = find_answer(responses[0])
    idx = token_indices_in_span(s.token_offsets, span.start, span.end)
    assert idx and "".join(responses[0][a:b] for a, b in (s.token_offsets[i] for i in idx)).count("18") == 1
    answer_mean = sum(s.token_logprobs[i] for i in idx) / len(idx)
    for w in (0.0, 0.3, 1.0):
        part = answer_span_score(s, responses[0], answer_weight=w, missing_answer_penalty=2.0)
        assert part.reward == pytest.approx(w * answer_mean + (1 - w) * s.mean_logprob)
        missing = answer_span_score(scores[1], responses[1], answer_weight=w, missing_answer_penalty=2.0)
        assert missing.answer is None and math.isfinite(missing.reward)
        assert missing.reward == pytest.approx(w * LOGPROB_FLOOR + (1 - w) * scores[1].mean_logprob - 2.0)
    ent = answer_span_score(s, responses[0], signal="neg_entropy", answer_weight=1.0)
    assert ent.reward == pytest.approx(-sum(s.token_entropies[i] for i in idx) / len(idx))
    reward = AnswerSpanCME(tiny_qwen_verifier, answer_weight=1.0, missing_answer_penalty=2.0)
    logged = {}
    values = reward(prompts=[prompt] * 3, completions=responses, log_metric=logged.__setitem__)
    assert values[0] == pytest.approx(answer_mean) and values[1] == pytest.approx(LOGPROB_FLOOR - 2.0)
    assert logged["cme_answer/missing_frac"] == pytest.approx(1 / 3) and reward.last_parts[0][2].span.kind == "gsm8k"


def test_answer_span_reward_refuses_scores_without_offsets(tiny_qwen_verifier):
    from cmerl.math_rewards import answer_span_score

    s = tiny_qwen_verifier.score(["q"], ["\\boxed{1}"])[0]
    s.token_offsets = None
    with pytest.raises(ValueError, match="no per-token character offsets"):
        answer_span_score(s, "\\boxed{1}")


def test_correctness_reward():
    from cmerl.math_rewards import Correctness

    logged = {}
    r = Correctness()(prompts=["a", "b", "c"], completions=["\\boxed{18}", "#### 1,000", "eighteen"],
                      answer=["18", "1000", "18"], log_metric=logged.__setitem__)
    assert r == [1.0, 1.0, 0.0] and logged["correctness/no_answer_frac"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="needs the gold answers"):
        Correctness()(prompts=["a"], completions=["\\boxed{1}"])


# ------------------------------------------------------------------------------------------------ configs
def test_maths_keys_are_validated():
    from cmerl.training import ConfigError
    from cmerl.training.config import TrainConfig, validate

    with pytest.raises(ConfigError, match="answer_weight"):
        validate(TrainConfig(rewards=["cme_answer"], prompts="gsm8k_train", answer_weight=1.5))
    with pytest.raises(ConfigError, match="correctness reward needs gold answers"):
        validate(TrainConfig(rewards=["correctness"], prompts="ultrafeedback"))
    with pytest.raises(ConfigError, match="cme_answer averages"):
        validate(TrainConfig(rewards=["cme_answer"], prompts="gsm8k_train", cme_signal="sum_logprob"))
    validate(TrainConfig(rewards=["cme_answer", "correctness"], prompts="gsm8k_train", reward_weights=[1.0, 0.0]))


def _configs() -> list[Path]:
    return [REPO / "configs" / "gsm8k-cpu.yaml", REPO / "configs" / "gsm8k-qwen-cpu.yaml", *sorted((REPO / "configs" / "paper").glob("*.yaml"))]


def test_paper_and_maths_configs_validate_and_name_their_reference():
    from cmerl.training import describe_run, load_config

    paths = _configs()
    assert len(paths) > 30
    for path in paths:
        cfg = load_config(path)
        assert describe_run(cfg)
        if path.parent.name == "paper":
            head = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
            assert "mattgorb/cme-grpo" in head and "configs/config" in head and "Differs" in head, path


def test_cpu_maths_config_passes_train_check():
    from typer.testing import CliRunner

    from cmerl.cli import app

    result = CliRunner().invoke(app, ["train", "--config", str(REPO / "configs" / "gsm8k-cpu.yaml"), "--check"])
    assert result.exit_code == 0, result.output
    assert "cme_answer" in result.output and "gsm8k_train" in result.output


# ------------------------------------------------------------------------------- eval-math and separation
@pytest.mark.e2e
def test_eval_math_and_separation_run_resume_and_refuse_other_jobs(tmp_path):
    import json

    from _training_helpers import tiny_random_folder

    from cmerl.math_eval import MathEvalSettings, evaluate_math
    from cmerl.separation import SIGNALS, SeparationSettings, format_table, run_separation

    policy = tiny_random_folder(tmp_path / "policy", "smollm2-135m-instruct", arch="llama", seed=0)
    verifier = tiny_random_folder(tmp_path / "verifier", "qwen2.5-coder-0.5b-instruct", arch="qwen2", seed=1)
    settings = MathEvalSettings(max_new_tokens=6, dtype="float32", batch_size=2)
    out = tmp_path / "eval"
    result = evaluate_math(str(policy), "gsm8k:3", out, settings)
    assert result.n_problems == 3 and 0.0 <= result.pass_at_1 <= 1.0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in records] == ["18", "3", "70000"] and all("extracted" in r for r in records)
    stamp = (out / "generations.json").stat().st_mtime_ns
    evaluate_math(str(policy), "gsm8k:2", out, settings)  # another slice of the same set: reused, not regenerated
    assert (out / "generations.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds another evaluation"):
        evaluate_math(str(policy), "gsm8k:3", out, MathEvalSettings(max_new_tokens=7, dtype="float32"))
    with pytest.raises(ValueError, match="temperature 0 would repeat"):
        MathEvalSettings(samples=2)

    sep_settings = SeparationSettings(samples=2, max_new_tokens=6, dtype="float32", n_boot=50)
    sep = run_separation(str(policy), str(verifier), "gsm8k:2", tmp_path / "sep", sep_settings,
                         verifier_dtype="float32")
    assert sep.n_solutions == 4 and [row["signal"] for row in sep.table] == list(SIGNALS)
    assert "| signal | scored by | AUROC, all |" in format_table(sep)
    records = [json.loads(line) for line in (tmp_path / "sep" / "records.jsonl").read_text().splitlines()]
    assert all(isinstance(r["policy_logprob_whole"], float) and r["neg_length"] <= 0 for r in records)
    saved = json.loads((tmp_path / "sep" / "verifier_verifier.json").read_text())
    assert [r["index"] for r in saved["signals"]] == [r["index"] for r in records]
    assert all(isinstance(r["verifier_logprob_whole"], float) for r in saved["signals"])

    # a second verifier on the same solutions: nothing is sampled or rescored but the new verifier
    other = tiny_random_folder(tmp_path / "other", "gemma-3-270m", arch="gemma3_text", seed=2)
    stamps = {f: (tmp_path / "sep" / f).stat().st_mtime_ns for f in ("generations.json", "records.jsonl",
                                                                      "verifier_verifier.json")}
    both = run_separation(str(policy), [str(verifier), str(other)], "gsm8k:2", tmp_path / "sep", sep_settings,
                          verifier_dtype="float32")
    assert {f: (tmp_path / "sep" / f).stat().st_mtime_ns for f in stamps} == stamps
    by = [(row.get("verifier"), row["signal"]) for row in both.table]
    assert by[:4] == [(str(verifier), n) for n in SIGNALS if n.startswith("verifier_")]
    assert by[4:8] == [(str(other), n) for n in SIGNALS if n.startswith("verifier_")]
    assert both.table[:4] == sep.table[:4] and both.table[8:] == sep.table[4:]  # same solutions, same AUROCs
    other_signals = json.loads((tmp_path / "sep" / "verifier_other.json").read_text())["signals"]
    assert [r["verifier_logprob_whole"] for r in other_signals] != [r["verifier_logprob_whole"] for r in saved["signals"]]
    # a verifier file cut short (a crash mid-copy, a bad edit) is scored again, not a crash
    (tmp_path / "sep" / "verifier_other.json").write_text('{"verifier": {"na')
    again = run_separation(str(policy), [str(verifier), str(other)], "gsm8k:2", tmp_path / "sep", sep_settings,
                           verifier_dtype="float32")
    assert again.table == both.table
    assert json.loads((tmp_path / "sep" / "verifier_other.json").read_text())["signals"] == other_signals
    with pytest.raises(ValueError, match="the same verifier is given twice"):
        run_separation(str(policy), [str(verifier), str(verifier)], "gsm8k:2", tmp_path / "sep", sep_settings)
    # the policy's weights replaced in place (same folder name): its old solutions are not reused as its own
    tiny_random_folder(tmp_path / "policy", "smollm2-135m-instruct", arch="llama", seed=5)
    with pytest.raises(ValueError, match=r"holds another evaluation \(policy differ"):
        run_separation(str(policy), str(verifier), "gsm8k:2", tmp_path / "sep", sep_settings,
                       verifier_dtype="float32")


@pytest.mark.e2e
def test_one_grpo_step_on_gsm8k_with_cme_answer_and_correctness(tmp_path):
    """The gold answers reach the rewards through TRL (the dataset's ``answer`` column), and both maths
    rewards are logged."""
    import json

    from _training_helpers import tiny_config, tiny_random_folder

    from cmerl.training import config_from_dict, train, validate

    policy = tiny_random_folder(tmp_path / "policy", "smollm2-135m-instruct", arch="llama", seed=0)
    verifier = tiny_random_folder(tmp_path / "verifier", "qwen2.5-coder-0.5b-instruct", arch="qwen2", seed=1)
    raw = tiny_config(tmp_path, policy, verifier, Path("gsm8k_train"), max_prompts=4,
                      max_prompt_length=192, max_steps=1, save_steps=1, rewards=["cme_answer", "correctness"],
                      answer_weight=0.5, missing_answer_penalty=1.0, policy_dtype="float32")
    cfg = config_from_dict(raw)
    validate(cfg)
    result = train(cfg)
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert {"rewards/cme_answer/mean", "rewards/correctness/mean", "cme_answer/missing_frac"} <= logged
    assert all(math.isfinite(r["rewards/cme_answer/mean"]) for r in rows if "rewards/cme_answer/mean" in r)
