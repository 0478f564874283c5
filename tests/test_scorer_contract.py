"""The Scorer contract: every real scorer satisfies it, every ResponseScore is built by one function, the
floor can be set per call, and the HTTP side of scoring imports without torch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from cmerl.scoring import AsyncScorer, Scorer, ScoreRequest, Verifier
from cmerl.scoring.remote import RemoteVerifier
from cmerl.scoring.types import response_score_from_token_logprobs
from cmerl.testing import tiny_for_tokenizer

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say nothing."]
RESPONSES = ["2 + 2 is 4.", "Blue, like the sky on a clear day.", ""]


@pytest.fixture(scope="module")
def verifier(smollm_tokenizer):
    return Verifier(tiny_for_tokenizer(smollm_tokenizer, seed=3), smollm_tokenizer, name="tiny-contract")


def test_every_real_scorer_satisfies_the_protocol(verifier, smollm_tokenizer):
    """The local engine, the policy-side baseline scorer (a Verifier over the policy model itself, as
    ``training/reward_setup.py`` builds it) and the HTTP client are Scorers; only the client is async."""
    policy_model = tiny_for_tokenizer(smollm_tokenizer, seed=4)
    policy_side = Verifier(policy_model, smollm_tokenizer, name="policy")
    remote = RemoteVerifier("http://127.0.0.1:9", smollm_tokenizer, check=False)  # no request is made
    for scorer in (verifier, policy_side, remote):
        assert isinstance(scorer, Scorer), type(scorer).__name__
    assert isinstance(remote, AsyncScorer)
    assert not isinstance(verifier, AsyncScorer) and not isinstance(policy_side, AsyncScorer)

    class ScoreOnly:  # a duck with score and name but no score_requests is not a Scorer
        name = "half"

        def score(self, prompts, responses, **kwargs):
            return []

    assert not isinstance(ScoreOnly(), Scorer)


def test_local_scores_are_built_by_the_one_builder(verifier):
    """The engine's ResponseScores (with and without entropy / self-certainty, empty response included)
    equal what response_score_from_token_logprobs builds from their per-token values."""
    for entropy, self_certainty in ((False, False), (True, True)):
        scores = verifier.score(PROMPTS, RESPONSES, entropy=entropy, self_certainty=self_certainty)
        assert scores[-1].n_tokens == 0 and scores[0].n_tokens > 0
        for s in scores:
            built = response_score_from_token_logprobs(
                s.token_logprobs, floor=verifier.logprob_floor, empty_score=verifier.empty_score,
                truncated=s.truncated, token_entropies=s.token_entropies,
                token_self_certainty=s.token_self_certainty)
            built.token_ids, built.token_offsets = s.token_ids, s.token_offsets
            assert built == s
            if s.n_tokens:
                assert s.mean_logprob == math.fsum(s.token_logprobs) / s.n_tokens


def test_builder_rules():
    s = response_score_from_token_logprobs([-1.0, float("-inf"), -30.0, float("nan")], floor=-20.0,
                                           empty_score=-7.0, token_entropies=[1.0, 2.0, 3.0, 6.0])
    assert s.token_logprobs == [-1.0, -20.0, -20.0, -20.0] and s.n_tokens == 4
    assert s.sum_logprob == -61.0 and s.mean_logprob == -15.25 and s.mean_entropy == 3.0
    assert s.token_self_certainty is None and s.mean_self_certainty is None
    empty = response_score_from_token_logprobs([], floor=-20.0, empty_score=-7.0, truncated=True,
                                               token_entropies=[], token_self_certainty=[])
    assert (empty.mean_logprob, empty.sum_logprob, empty.mean_entropy, empty.mean_self_certainty) == (-7.0, -7.0, 7.0, 0.0)
    assert empty.truncated and empty.token_logprobs == [] and empty.n_tokens == 0


def test_floor_is_set_per_call_without_changing_the_verifier(verifier, smollm_tokenizer):
    """score_requests(logprob_floor=...) clamps this call only; it equals a verifier built with that floor,
    and the reward service scores with the verifier it was given (no copy with another floor)."""
    from cmerl.serving import Options, create_app

    reqs = verifier.render_all(PROMPTS, RESPONSES)
    default = verifier.score_requests(reqs)
    lowest = min(min(s.token_logprobs) for s in default if s.n_tokens)
    floor = lowest + 1.0  # above the lowest token: that token is clamped at this floor
    assert lowest > verifier.logprob_floor
    clamped = verifier.score_requests(reqs, logprob_floor=floor)
    assert verifier.logprob_floor == -20.0
    assert any(x == floor for s in clamped for x in s.token_logprobs)
    assert all(x >= floor for s in clamped for x in s.token_logprobs)
    twin = Verifier(verifier.model, smollm_tokenizer, logprob_floor=floor, empty_score=verifier.empty_score)
    assert [s.token_logprobs for s in twin.score_requests(reqs)] == [s.token_logprobs for s in clamped]
    assert clamped[-1].mean_logprob == verifier.empty_score  # the empty response keeps the empty score
    assert verifier.score_requests(reqs) == default  # nothing stuck

    app = create_app(verifier)
    assert app.state.service.verifier is verifier and verifier.logprob_floor == -20.0
    raw = app.state.service._engine([ScoreRequest(reqs[1].input_ids, reqs[1].response_start)], Options())
    assert raw[0].token_logprobs == pytest.approx(default[1].token_logprobs, abs=1e-6)


def test_http_side_of_scoring_imports_without_torch():
    """The contract, the request helpers, the HTTP client, the retry policy and the server app load
    without torch (the engine, cmerl.scoring.local, is the only torch user among them)."""
    code = ("import sys; import cmerl.scoring.types, cmerl.scoring.requests, cmerl.scoring.remote, "
            "cmerl.http_retry, cmerl.serving.app; from cmerl.scoring import Scorer, ScoreRequest; "
            "print(sorted(m for m in ('torch', 'transformers', 'cmerl.scoring.local') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
