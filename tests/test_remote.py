"""RemoteVerifier: same scores as the local engine through a real server, protocol checks, retries, errors."""

from __future__ import annotations

import asyncio
import math
import pickle
import time

import pytest
from _server_helpers import PAIRS, free_port

from cmerl.scoring.remote import (
    RemoteScoringError,
    RemoteVerifier,
    VerifierMismatchError,
    read_prompt_logprobs,
)
from cmerl.scoring.types import ScoreRequest, response_score_from_token_logprobs

pytest_plugins = ["_server_fixtures"]  # tiny_verifier_dir, tiny_local, tiny_server fixtures

PROMPTS = [p for p, _ in PAIRS]
RESPONSES = [r for _, r in PAIRS]


def assert_same(remote, local, *, tol=1e-4, fields=("mean_logprob", "sum_logprob")):
    assert len(remote) == len(local)
    for i, (a, b) in enumerate(zip(remote, local)):
        assert a.n_tokens == b.n_tokens, i
        assert a.truncated == b.truncated, i
        for f in fields:
            assert getattr(a, f) == pytest.approx(getattr(b, f), abs=tol), (i, f)
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=tol), i


@pytest.mark.parametrize("protocol", ["openai", "cmerl"])
def test_remote_equals_local(protocol, tiny_server, tiny_local):
    local = tiny_local.score(PROMPTS, RESPONSES)
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer, protocol=protocol) as rv:
        remote = rv.score(PROMPTS, RESPONSES)
        assert rv.info.protocol == protocol
        # the same rendering code: identical token spans
        assert [rv.render(p, r) for p, r in PAIRS] == [tiny_local.render(p, r) for p, r in PAIRS]
    assert_same(remote, local)
    assert remote[5].n_tokens == 0 and remote[5].mean_logprob == tiny_local.empty_score


def test_auto_protocol_detects_cmerl_and_text_mode(tiny_server, tiny_local):
    """``auto`` picks /score on a cmerl server; without a tokenizer the server renders the text pairs."""
    local = tiny_local.score(PROMPTS, RESPONSES, entropy=True, self_certainty=True)
    with RemoteVerifier(tiny_server.url, None) as rv:
        remote = rv.score(PROMPTS, RESPONSES, entropy=True, self_certainty=True)
        assert rv.info.protocol == "cmerl" and rv.info.vocab_size == len(tiny_local.tokenizer)
        with pytest.raises(ValueError, match="no tokenizer"):
            rv.render("a", "b")
    assert_same(remote, local, fields=("mean_logprob", "sum_logprob", "mean_entropy", "mean_self_certainty"))


def test_floor_empty_score_and_truncation_follow_local_rules(tiny_server, tiny_verifier_dir):
    """Custom floor / empty score / max_length on the client give what a local engine with them gives."""
    from cmerl.scoring import Verifier

    local = Verifier.from_pretrained(str(tiny_verifier_dir), dtype="float32", logprob_floor=-10.7,
                                     empty_score=-3.0, max_length=40)
    prompts = ["Say a lot.", "Nothing.", "Short?"]
    responses = ["word " * 60, "", "yes"]
    want = local.score(prompts, responses)
    assert want[0].truncated and want[0].n_tokens == 39  # a response longer than the limit keeps 1 context token
    assert any(abs(lp + 10.7) < 1e-5 for lp in want[0].token_logprobs)  # the floor bites
    with RemoteVerifier(tiny_server.url, local.tokenizer, protocol="cmerl", logprob_floor=-10.7, empty_score=-3.0,
                        max_length=40) as rv:
        got = rv.score(prompts, responses)
    assert_same(got, want)
    assert got[1].mean_logprob == -3.0


def test_score_requests_and_chunking(tiny_server, tiny_local):
    """Already-tokenized requests, split into many small HTTP requests, come back in input order."""
    reqs = [tiny_local.render(p, r) for p, r in PAIRS] * 3
    want = tiny_local.score_requests(reqs)
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer, protocol="openai", chunk_size=2,
                        max_concurrency=3) as rv:
        got = rv.score_requests(reqs)
    assert_same(got, want)


def test_ascore_overlaps_concurrent_calls(tiny_server, tiny_local):
    want = tiny_local.score(PROMPTS, RESPONSES)

    async def main(rv):
        return await asyncio.gather(*(rv.ascore([p], [r]) for p, r in PAIRS))

    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer, max_concurrency=8) as rv:
        got = asyncio.run(main(rv))
    assert_same([g[0] for g in got], want)


def test_tokenizer_mismatch_is_refused(tiny_server, qwen_tokenizer, gemma_tokenizer):
    for tok in (qwen_tokenizer, gemma_tokenizer):
        for protocol in ("openai", "cmerl"):
            with RemoteVerifier(tiny_server.url, tok, protocol=protocol) as rv, \
                    pytest.raises(VerifierMismatchError, match="tokeniz|vocabulary"):
                rv.score(["a"], ["b"])


def test_openai_protocol_refuses_entropy(tiny_server, tiny_local):
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer, protocol="openai") as rv, \
            pytest.raises(ValueError, match="protocol"):
        rv.score(["a"], ["b"], entropy=True)


def test_wrong_model_name_is_refused(tiny_server, tiny_local):
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer, protocol="openai", model="some-other-model") as rv, \
            pytest.raises(VerifierMismatchError, match="some-other-model"):
        rv.score(["a"], ["b"])


def test_unreachable_server_fails_after_retries():
    url = f"http://127.0.0.1:{free_port()}"
    with RemoteVerifier(url, None, max_retries=2, backoff=0.05) as rv:
        t0 = time.perf_counter()
        with pytest.raises(RemoteScoringError, match="after 3 attempts"):
            rv.score(["a"], ["b"])
    assert time.perf_counter() - t0 < 10


def test_client_errors_are_not_retried(tiny_server, tiny_local):
    """A 4xx answer raises at once with the server's message (here: a token id outside the vocabulary)."""
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer, protocol="cmerl", max_retries=5,
                        backoff=5.0) as rv:
        t0 = time.perf_counter()
        with pytest.raises(RemoteScoringError, match="outside the vocabulary") as info:
            rv.score_requests([ScoreRequest([1, 2, 10 ** 7], 1)])
    assert info.value.status == 422 and time.perf_counter() - t0 < 5


def test_pickles_without_its_connection(tiny_server, tiny_local):
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer) as rv:
        first = rv.score(PROMPTS[:2], RESPONSES[:2])
        clone = pickle.loads(pickle.dumps(rv))
    with clone:
        assert_same(clone.score(PROMPTS[:2], RESPONSES[:2]), first)


def test_cross_model_entropy_with_remote_verifier(tiny_server, tiny_local):
    from cmerl.rewards import CrossModelEntropy

    metrics = {}
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer) as rv:
        reward = CrossModelEntropy(rv)
        got = reward(prompts=PROMPTS, completions=RESPONSES, log_metric=metrics.__setitem__)
    want = [s.mean_logprob for s in tiny_local.score(PROMPTS, RESPONSES)]
    assert got == pytest.approx(want, abs=1e-4)
    assert metrics["cme/response_tokens_mean"] > 0


def test_read_prompt_logprobs_vllm_layout():
    """vLLM's layout: None at position 0; str(token id) keys; actual token present besides the top-k."""
    choice = [None,
              {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}, "9": {"logprob": -2.0, "rank": 3}},
              {"3": {"logprob": -9999.0, "rank": 50000, "decoded_token": "b"}}]
    assert read_prompt_logprobs(choice, [1, 9, 3], 1) == [-2.0, -9999.0]
    with pytest.raises(RemoteScoringError, match="no log-prob for token 4"):
        read_prompt_logprobs(choice, [1, 9, 4], 1)
    with pytest.raises(RemoteScoringError, match="2 positions"):
        read_prompt_logprobs(choice[:2], [1, 9, 3], 1)
    s = response_score_from_token_logprobs([-2.0, -9999.0, float("nan")], floor=-20.0, empty_score=-20.0)
    assert s.token_logprobs == [-2.0, -20.0, -20.0] and math.isclose(s.mean_logprob, -14.0)


def test_text_mode_sends_an_explicit_render_config(tiny_server, tiny_verifier_dir):
    """Without a tokenizer, a RemoteVerifier given ``render=`` has the server render that way."""
    from cmerl.formatting import RenderConfig
    from cmerl.scoring import Verifier

    render = RenderConfig(system_prompt="Be terse.", include_eos=True)
    local = Verifier.from_pretrained(str(tiny_verifier_dir), dtype="float32", render=render)
    want = local.score(PROMPTS, RESPONSES)
    with RemoteVerifier(tiny_server.url, None, render=render) as rv:
        got = rv.score(PROMPTS, RESPONSES)
    assert_same(got, want)
    default = Verifier.from_pretrained(str(tiny_verifier_dir), dtype="float32").score(PROMPTS, RESPONSES)
    assert [g.n_tokens for g in got] != [d.n_tokens for d in default]  # the render config made a difference


def test_independence_guard_sees_the_served_model(tiny_server, tiny_local, tiny_verifier_dir):
    """CME refuses a remote verifier that serves the policy itself (compared by the served model's source)."""
    from cmerl.rewards import CrossModelEntropy, SelfVerificationError

    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer) as rv:
        with pytest.raises(SelfVerificationError):
            CrossModelEntropy(rv, policy=str(tiny_verifier_dir))
        CrossModelEntropy(rv, policy="smollm2-135m-instruct")  # another model: accepted
