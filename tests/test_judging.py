"""Judges: prompt file, verdict parsing, the decision rule, the local log-prob judge on tiny models (against
a plain forward pass), resumable runs, and an OpenAI-compatible judge against a real HTTP server process."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest
import torch
from _eval_helpers import (
    JudgeServer,
    quality,
    rule_logprobs,
    single_thread,  # noqa: F401  (fixture, used via pytestmark)
)

from cmerl.judging import (
    DecisionRule,
    Job,
    JudgeConnectionError,
    JudgePrompt,
    LocalJudge,
    OpenAIJudge,
    OrderResult,
    Pair,
    decide,
    judge_pairs,
    parse_verdict,
    read_verdicts,
    run_judge,
    truncate_response,
    verdicts_header,
)

PAIRS = [
    Pair(0, "Name a prime number.", "7 is a prime number.", "Bananas are yellow."),
    Pair(1, "What is the capital of France?", "Paris.", "The capital of France is Paris, a city on the Seine."),
    Pair(2, "Write a haiku about rain {with braces}.", "Rain taps on the roof\nsoft {response_b} voices\nsleep comes",
         ""),
    Pair(3, "Say hi.", "hi", "Hello! How can I help you today?"),
    Pair(4, "Count to three.", "1, 2, 3", "one two three four"),
]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see _eval_helpers


# --------------------------------------------------------------------------- prompt and parsing
def test_packaged_prompt_loads_and_fills_placeholders_once():
    p = JudgePrompt.load()
    assert p.text == resources.files("cmerl").joinpath("prompts", "pairwise_judge.txt").read_text()
    assert p.prefill == "The better response is Response"
    msg = p.user_message("I {response_b}", "x {instruction}", "y")
    assert "I {response_b}" in msg and "x {instruction}" in msg  # placeholders inside values stay literal
    assert msg.index("x {instruction}") < msg.index("\ny\n")


def test_prompt_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("<<<system>>>\nS\n<<<user>>>\n{instruction} {response_a}\n")
    with pytest.raises(ValueError, match="assistant_prefill"):
        JudgePrompt.load(bad)
    bad.write_text("<<<system>>>\nS\n<<<user>>>\n{instruction} {response_a}\n<<<assistant_prefill>>>\nX\n")
    with pytest.raises(ValueError, match="response_b"):
        JudgePrompt.load(bad)
    with pytest.raises(FileNotFoundError, match=r"judge prompt file not found: .*missing\.txt"):
        JudgePrompt.load(tmp_path / "missing.txt")


@pytest.mark.parametrize("text, letter", [
    ("The better response is Response A", "A"),
    ("Thinking...\nThe better response is Response B.", "B"),
    ("the better response is: **Response B**", "B"),
    (" A", "A"),
    ("B", "B"),
    ("[[A]]", "A"),
    ("Both are fine.", None),
    ("", None),
    ("The better response is Response C", None),
    ("Response A is long. The better response is Response B", "B"),
])
def test_parse_verdict(text, letter):
    assert parse_verdict(text) == letter


def test_truncate_response():
    assert truncate_response("abcdef", 3) == "abc\n[... truncated]"
    assert truncate_response("abc", 3) == "abc"
    assert truncate_response("abcdef", 0) == "abcdef"


# --------------------------------------------------------------------------- the decision rule
def _lp(a: float, b: float) -> OrderResult:
    return OrderResult("A" if a >= b else "B", a, b)


def test_decide_sums_margins_over_orders():
    # ab: A=a, log-odds +1.0 for a; ba: A=b, lpA-lpB = 0.4 -> -0.4 for a. Sum 0.6 > threshold 0.2: a wins.
    verdict, margin, consistent = decide(_lp(-0.3, -1.3), _lp(-0.5, -0.9), DecisionRule(0.2))
    assert verdict == "a" and margin == pytest.approx(0.6) and consistent is False
    # The same pair is a tie when consistency is required, or when the threshold exceeds the margin.
    assert decide(_lp(-0.3, -1.3), _lp(-0.5, -0.9), DecisionRule(0.2, require_consistent=True))[0] == "tie"
    assert decide(_lp(-0.3, -1.3), _lp(-0.5, -0.9), DecisionRule(0.7))[0] == "tie"
    # Consistent preference for b: ab says B by 2, ba says A (= b) by 1 -> margin -3.
    verdict, margin, consistent = decide(_lp(-2.5, -0.5), _lp(-0.4, -1.4))
    assert (verdict, consistent) == ("b", True) and margin == pytest.approx(-3.0)


def test_decide_parse_mode_and_errors():
    a_first, a_second = OrderResult("A"), OrderResult("B")  # both say system a
    assert decide(a_first, a_second) == ("a", None, True)
    assert decide(OrderResult("A"), OrderResult("A")) == ("tie", None, False)  # position-biased: tie
    assert decide(OrderResult(None, error="x"), OrderResult("A"))[0] == "error"
    with pytest.raises(ValueError, match=r"threshold must be >= 0 \(got -1\.0\)"):
        DecisionRule(-1.0)


# --------------------------------------------------------------------------- local judge on tiny models
def _reference_choice_logprobs(judge: LocalJudge, job: Job) -> tuple[float, float]:
    """One unpadded forward pass through ``model(ids).logits`` in float64."""
    ids, ia, ib = judge.encode_job(job)
    with torch.no_grad():
        logits = judge.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[ia]), float(logp[ib])


@pytest.mark.parametrize("family", ["smollm", "qwen", "gemma"])
def test_local_judge_matches_plain_forward(family, request):
    tok = request.getfixturevalue(f"{family}_tokenizer")
    model = request.getfixturevalue({"smollm": "tiny_llama", "qwen": "tiny_qwen", "gemma": "tiny_gemma"}[family])
    judge = LocalJudge(model, tok, name=f"tiny-{family}", max_batch_tokens=100_000)
    jobs = [Job(p.instruction, p.output_a, p.output_b) for p in PAIRS]  # different lengths: padding matters
    results = judge.judge(jobs)
    assert len(results) == len(jobs)
    for job, r in zip(jobs, results):
        la, lb = _reference_choice_logprobs(judge, job)
        assert r.logprob_A == pytest.approx(la, abs=1e-4) and r.logprob_B == pytest.approx(lb, abs=1e-4)
        assert r.choice == ("A" if la >= lb else "B") and r.error is None
        assert r.extra["choice_mass"] == pytest.approx(math.exp(la) + math.exp(lb), rel=1e-3)
    ids, ia, ib = judge.encode_job(jobs[0])
    assert tok.decode([ia]).strip() == "A" and tok.decode([ib]).strip() == "B"
    assert "The better response is Response" in tok.decode(ids[-8:])


@pytest.mark.parametrize("family", ["smollm", "qwen", "gemma"])
def test_local_judge_prefix_reuse_matches_the_plain_path(family, request):
    """The shared-prefix KV cache changes nothing but rounding: the prefix built from one batch is reused by
    later calls and one-row batches; contexts run far past tiny Gemma's 64-token sliding window."""
    tok = request.getfixturevalue(f"{family}_tokenizer")
    model = request.getfixturevalue({"smollm": "tiny_llama", "qwen": "tiny_qwen", "gemma": "tiny_gemma"}[family])
    jobs = [Job(p.instruction, p.output_a, p.output_b) for p in PAIRS]
    plain = LocalJudge(model, tok, name="plain", max_batch_tokens=100_000).judge(jobs)
    reuse = LocalJudge(model, tok, name="reuse", max_batch_tokens=100_000, prefix_reuse=True)
    batches: list[int] = []
    forward = reuse.next_token_logprobs
    reuse.next_token_logprobs = lambda contexts: batches.append(len(contexts)) or forward(contexts)
    first = reuse.judge(jobs[:3])  # one batch of 3: the prefix is built from it
    reuse.max_batch_tokens = 1  # one row per forward: each reuses the kept prefix
    second = reuse.judge(jobs[3:])
    assert batches == [3, 1, 1]
    assert reuse.prefix_forwards == 1 and reuse.prefix_reuse  # built once, kept across batches and calls
    assert len(reuse._prefix[0]) >= 64 or family != "gemma"  # the cache spans a whole sliding window
    assert min(len(reuse.encode_job(j)[0]) for j in jobs) > 64 + len(reuse._prefix[0]) or family != "gemma"
    for p, r in zip(plain, first + second):
        assert r.logprob_A == pytest.approx(p.logprob_A, abs=1e-4)
        assert r.logprob_B == pytest.approx(p.logprob_B, abs=1e-4)
        assert r.choice == p.choice


def test_local_judge_prefix_reuse_skips_what_it_cannot_share(smollm_tokenizer, tiny_llama):
    """One context and no kept prefix: the plain path (a one-row cache saves nothing); no common start of
    ``MIN_PREFIX_TOKENS``: the plain path too."""
    judge = LocalJudge(tiny_llama, smollm_tokenizer, prefix_reuse=True)
    judge.judge([Job(PAIRS[0].instruction, PAIRS[0].output_a, PAIRS[0].output_b)])
    assert judge.prefix_forwards == 0
    ids = smollm_tokenizer("alpha beta gamma delta epsilon zeta eta theta").input_ids
    other = smollm_tokenizer("zebra beta gamma delta epsilon zeta eta theta").input_ids
    out = judge.next_token_logprobs([ids, other])
    assert judge.prefix_forwards == 0 and out.shape == (2, tiny_llama.config.vocab_size)


def test_local_judge_truncates_long_responses(smollm_tokenizer, tiny_llama):
    judge = LocalJudge(tiny_llama, smollm_tokenizer, max_response_chars=50)
    ids, _, _ = judge.encode_job(Job("Q", "x" * 5000, "short"))
    text = smollm_tokenizer.decode(ids)
    assert "[... truncated]" in text and "x" * 51 not in text


class CountingJudge:
    """Delegates to a real judge and counts the jobs it was given (to check that resuming redoes nothing)."""

    def __init__(self, inner):
        self.inner, self.name, self.jobs = inner, inner.name, 0
        self.prompt = inner.prompt

    def settings(self):
        return self.inner.settings()

    def judge(self, jobs):
        self.jobs += len(jobs)
        return self.inner.judge(jobs)


def test_run_judge_rows_and_resume(tmp_path, smollm_tokenizer, tiny_llama):
    judge = CountingJudge(LocalJudge(tiny_llama, smollm_tokenizer, name="tiny"))
    rule = DecisionRule(0.0)
    header = verdicts_header(judge, rule, judge.prompt, a={"generator": "sys-a"}, b={"generator": "sys-b"})
    out = tmp_path / "verdicts.jsonl"
    first = run_judge(judge, PAIRS, out, rule=rule, header=header, chunk_pairs=1, stop_after=2)
    assert len(first) == 2 and judge.jobs == 4  # two pairs, both orders
    lines_before = out.read_text().splitlines()
    rows = run_judge(judge, PAIRS, out, rule=rule, header=header, chunk_pairs=2)
    assert judge.jobs == 10  # only the 3 missing pairs were judged (6 more jobs)
    assert out.read_text().splitlines()[:3] == lines_before  # earlier rows untouched
    hdr, stored = read_verdicts(out)
    assert hdr["prompt"]["text"] == JudgePrompt.load().text and hdr["judge"]["name"] == "tiny"
    assert [r["index"] for r in stored] == [0, 1, 2, 3, 4] and [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    for p, r in zip(PAIRS, stored):
        ab, ba = r["orders"]["ab"], r["orders"]["ba"]
        margin = (ab["logprob_A"] - ab["logprob_B"]) - (ba["logprob_A"] - ba["logprob_B"])
        assert r["margin"] == pytest.approx(margin)
        assert r["verdict"] == ("a" if margin > 0 else "b" if margin < 0 else "tie")
        assert (r["len_a"], r["len_b"]) == (len(p.output_a), len(p.output_b))
    # A judged pair in order ab sees a as Response A: check against a direct call.
    direct = judge.inner.judge([Job(PAIRS[0].instruction, PAIRS[0].output_a, PAIRS[0].output_b)])[0]
    assert stored[0]["orders"]["ab"]["logprob_A"] == pytest.approx(direct.logprob_A, abs=1e-5)


def test_run_judge_refuses_other_settings(tmp_path, smollm_tokenizer, tiny_llama):
    judge = LocalJudge(tiny_llama, smollm_tokenizer, name="tiny")
    out = tmp_path / "v.jsonl"
    h1 = verdicts_header(judge, DecisionRule(0.0), judge.prompt, a={}, b={})
    run_judge(judge, PAIRS[:1], out, rule=DecisionRule(0.0), header=h1)
    before = out.read_bytes()
    h2 = verdicts_header(judge, DecisionRule(0.5), judge.prompt, a={}, b={})
    with pytest.raises(ValueError, match="different decision"):
        run_judge(judge, PAIRS, out, rule=DecisionRule(0.5), header=h2)
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- OpenAI-compatible endpoint
GOOD_PAIRS = [
    Pair(0, "Q0", "GOOD GOOD answer", "plain answer"),        # q(a) - q(b) = 2
    Pair(1, "Q1", "plain", "GOOD answer"),                     # -1
    Pair(2, "Q2", "same", "same"),                             # 0
    Pair(3, "Q3", "GOOD", "GOOD GOOD GOOD"),                   # -2
]


@pytest.fixture(scope="module")
def judge_server():
    server = JudgeServer()
    yield server
    server.stop()


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_endpoint_logprob_judge_matches_rule(judge_server, api):
    judge = OpenAIJudge(judge_server.base_url, "rules", api=api, concurrency=3)
    rows = judge_pairs(judge, GOOD_PAIRS, DecisionRule(0.2))
    for p, r in zip(GOOD_PAIRS, rows):
        d = quality(p.output_a) - quality(p.output_b)
        # position bias 0.5 cancels: summed margin = 4 (q(a) - q(b)), see _eval_helpers
        assert r["margin"] == pytest.approx(4 * d, abs=1e-9)
        assert r["verdict"] == ("a" if d > 0 else "b" if d < 0 else "tie")
        lps = rule_logprobs(p.output_a, p.output_b)
        assert r["orders"]["ab"]["logprob_A"] == pytest.approx(lps[" A"])
    # the equal pair: both orders pick A (the position bias) -> inconsistent, margin 0 -> tie
    assert rows[2]["consistent"] is False


def test_endpoint_parse_mode_and_position_bias(judge_server):
    rows = judge_pairs(OpenAIJudge(judge_server.base_url, "rules-text"), GOOD_PAIRS)
    assert [r["verdict"] for r in rows] == ["a", "b", "tie", "b"]
    assert all(r["margin"] is None for r in rows)
    assert rows[0]["orders"]["ab"]["raw"] == "The better response is Response A"
    rows = judge_pairs(OpenAIJudge(judge_server.base_url, "positional", api="completions"), GOOD_PAIRS[:2])
    assert [r["verdict"] for r in rows] == ["tie", "tie"] and all(r["consistent"] is False for r in rows)


def test_endpoint_unparseable_output_is_retried_once_then_an_error(judge_server):
    before = judge_server.stats().get("garbage", 0)
    rows = judge_pairs(OpenAIJudge(judge_server.base_url, "garbage"), GOOD_PAIRS[:2])
    assert judge_server.stats()["garbage"] - before == 8  # 2 pairs x 2 orders x 2 attempts
    for r in rows:
        assert r["verdict"] == "error"
        assert r["orders"]["ab"]["attempts"] == 2 and "unparseable" in r["orders"]["ab"]["error"]
    rows = judge_pairs(OpenAIJudge(judge_server.base_url, "flaky"), GOOD_PAIRS[:1])
    assert rows[0]["verdict"] == "a" and rows[0]["orders"]["ab"]["attempts"] == 2


def test_endpoint_errors_abort_cleanly_and_keep_rows(judge_server, tmp_path):
    out = tmp_path / "v.jsonl"
    ok = OpenAIJudge(judge_server.base_url, "rules")
    header = verdicts_header(ok, DecisionRule(), ok.prompt, a={}, b={})
    run_judge(ok, GOOD_PAIRS[:2], out, header=header)
    bad = OpenAIJudge(judge_server.base_url, "no-such-model", retries=0)
    with pytest.raises(JudgeConnectionError, match="404"):
        bad.judge([Job("q", "a", "b")])
    dead = OpenAIJudge("http://127.0.0.1:9/v1", "rules", retries=1, timeout=2)
    with pytest.raises(JudgeConnectionError, match="failed after 2 tries"):
        run_judge(dead, GOOD_PAIRS, out, header=verdicts_header(ok, DecisionRule(), ok.prompt, a={}, b={}))
    assert len(read_verdicts(out)[1]) == 2  # rows judged before are still there


def test_endpoint_api_key_from_env(tmp_path, monkeypatch):
    server = JudgeServer(api_key="s3cret")
    try:
        with pytest.raises(JudgeConnectionError, match="401"):
            OpenAIJudge(server.base_url, "rules").judge([Job("q", "a", "b")])
        monkeypatch.setenv("TEST_JUDGE_KEY", "s3cret")
        judge = OpenAIJudge(server.base_url, "rules", api_key_env="TEST_JUDGE_KEY")
        assert judge_pairs(judge, GOOD_PAIRS[:1])[0]["verdict"] == "a"
        assert "s3cret" not in json.dumps(judge.settings())  # the key is never recorded
        monkeypatch.delenv("TEST_JUDGE_KEY")
        with pytest.raises(ValueError, match="TEST_JUDGE_KEY"):
            OpenAIJudge(server.base_url, "rules", api_key_env="TEST_JUDGE_KEY")
    finally:
        server.stop()


# --------------------------------------------------------------------------- packaged judge (slow)
@pytest.mark.slow
def test_packaged_qwen_judge_prefers_the_answer_to_the_right_prompt():
    """Qwen2.5-Coder-1.5B-Instruct (dtype auto: bf16 only where the CPU runs it natively; emulated bf16 made
    this test take 20 minutes on an AVX2 CPU): a real answer beats an answer to another prompt in most pairs."""
    import os

    from cmerl.checks import load_reference_pairs

    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use the cores (single_thread restores it)
    refs = sorted(load_reference_pairs(), key=lambda r: len(r.pair.output_a))
    real = [r.pair for r in refs if 60 <= len(r.pair.output_a) <= 250][:4]  # short: cheap on CPU
    assert len(real) == 4
    pairs = [Pair(k, p.instruction, p.output_a, real[(k + 1) % 4].output_a) for k, p in enumerate(real)]
    judge = LocalJudge.from_pretrained("qwen2.5-coder-1.5b-instruct")
    rows = judge_pairs(judge, pairs, DecisionRule(0.2))
    wins = [r["verdict"] for r in rows].count("a")
    assert wins >= 3, [(r["verdict"], r["margin"]) for r in rows]


@pytest.mark.parametrize("alias, family", [("qwen2.5-coder-1.5b-instruct", "qwen"),
                                           ("qwen2.5-coder-0.5b-instruct", "qwen"),
                                           ("smollm2-135m-instruct", "smollm"), ("gemma-3-270m", "gemma")])
def test_packaged_agreement_matches_the_default_setup(alias, family, request):
    """The stored agreements apply only to the default prompt, settings and rule: changing any of them must
    change the key (then re-run judge-check and update PACKAGED_AGREEMENT and benchmarks/RESULTS.md)."""
    from cmerl.agreement_registry import PACKAGED_AGREEMENT, lookup_agreement
    from cmerl.judging import judge_key

    tok = request.getfixturevalue(f"{family}_tokenizer")
    model = request.getfixturevalue({"smollm": "tiny_llama", "qwen": "tiny_qwen", "gemma": "tiny_gemma"}[family])
    judge = LocalJudge(model, tok, name=alias, dtype="bfloat16")  # measured in bf16: auto and fp32 share it
    header = verdicts_header(judge, DecisionRule(), judge.prompt, a={}, b={})
    for dtype in ("auto", "float32"):
        same = verdicts_header(LocalJudge(model, tok, name=alias, dtype=dtype), DecisionRule(), judge.prompt,
                               a={}, b={})
        assert judge_key(same) == judge_key(header)
    assert PACKAGED_AGREEMENT[judge_key(header)]["judge"] == alias
    assert lookup_agreement(header)["judge"] == alias
    other = verdicts_header(judge, DecisionRule(0.5), judge.prompt, a={}, b={})
    assert judge_key(other) not in PACKAGED_AGREEMENT


def test_packaged_agreement_of_the_reference_guided_judge(qwen_tokenizer, tiny_qwen):
    """Qwen2.5-Coder-1.5B in reference-guided mode (the packaged prompt and the bundled GPT-4 Turbo answers)
    has its own measured pairs agreement, under its own key: the pairwise figures are not inherited."""
    from cmerl.agreement_registry import PACKAGED_AGREEMENT, lookup_agreement
    from cmerl.judge_modes import ReferencePrompt
    from cmerl.judging import judge_key

    judge = LocalJudge(tiny_qwen, qwen_tokenizer, name="qwen2.5-coder-1.5b-instruct", dtype="bfloat16")
    pairwise = verdicts_header(judge, DecisionRule(), judge.prompt, a={}, b={})
    reference = ReferencePrompt.build()
    judge.prompt = reference
    header = verdicts_header(judge, DecisionRule(), reference, a={}, b={})
    assert judge_key(header) != judge_key(pairwise)
    found = lookup_agreement(header)
    assert found is not None and found.get("agreement") is None  # no easy-pair check in this mode
    assert set(found["pairs"]) == {"phi-2-sft__vs__phi-2", "FuseChat-Llama-3.2-1B-Instruct__vs__gemma-2b-it"}
    assert found["pairs"] != PACKAGED_AGREEMENT[judge_key(pairwise)]["pairs"]
