"""Shared pytest fixtures: real tokenizers of the three model families and tiny random models for them.

Everything here is session-scoped and cheap (tokenizers load from the packaged models' converted cache in
about a second each; tiny models are built in code in well under a second). Tests must not mutate these
objects (no training, no ``config`` edits): build your own with :func:`cmerl.testing.tiny_for_tokenizer`
when you need to change one.

Tokenizers (real, from the packaged models via :func:`cmerl.models.load_tokenizer`):

* ``smollm_tokenizer``: SmolLM2-135M-Instruct (Llama family, ChatML template that injects a default
  system prompt, vocab 49,152).
* ``qwen_tokenizer``: Qwen2.5-Coder-0.5B-Instruct (Qwen2.5 family, ChatML template with a default system
  prompt, vocab 151,936).
* ``gemma_tokenizer``: Gemma 3 270M base (Gemma 3 family, no chat template: plain format, BOS added).
* ``family_tokenizer``: parametrized over the three above (``request.param`` is the family name).

Tiny random causal LMs (hidden 32, 2 layers, fp32, eval mode), sized and wired for those tokenizers:

* ``tiny_llama`` (llama arch, seed 0), ``tiny_qwen`` (qwen2 arch, seed 0), ``tiny_gemma`` (gemma3_text
  arch, seed 0): use them as a "policy".
* ``tiny_llama_verifier``, ``tiny_qwen_verifier``, ``tiny_gemma_verifier``: :class:`cmerl.scoring.Verifier`
  over a *different* random model (seed 1) with the same tokenizer, so a verifier never is the policy.
  Their output projection is scaled by ``PEAK_SCALE`` (20) so next-token distributions are peaked
  (entropy ~5-10 nats instead of log V ~11-12, log-probs spread from ~-2 to the -20 floor), which makes
  entropy and log-prob comparisons discriminative.
* ``tiny_verifier``: parametrized over the three tiny verifiers.

Packaged models (mark tests using them ``@pytest.mark.slow``):

* ``smollm_verifier_fp32``: ``Verifier.from_pretrained("smollm2-135m-instruct", dtype="float32")``.

Other helpers:

* ``tmp_cache``: points ``$CMERL_CACHE`` at a fresh temporary folder for the test (model conversions
  then never touch the user's cache) and returns it.

The whole test session runs with ``HF_HUB_OFFLINE=1`` (unless already set), so a hub id that is not
cached fails at once instead of retrying the network for a minute.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "ci" (default) keeps every property test to a few seconds on a 2-core machine;
# HYPOTHESIS_PROFILE=thorough tries 20x more examples. No example database: runs do not write to the tree.
settings.register_profile("ci", max_examples=40, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=800, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SMOLLM = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma-3-270m"
PEAK_SCALE = 20.0  # tiny verifiers' output projection is scaled by this
FAMILIES = {"smollm": (SMOLLM, "llama"), "qwen": (QWEN, "qwen2"), "gemma": (GEMMA, "gemma3_text")}


def _tokenizer(alias: str):
    from cmerl.models import load_tokenizer

    return load_tokenizer(alias)


@pytest.fixture(scope="session")
def smollm_tokenizer():
    return _tokenizer(SMOLLM)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return _tokenizer(QWEN)


@pytest.fixture(scope="session")
def gemma_tokenizer():
    return _tokenizer(GEMMA)


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_tokenizer(request):
    """One of the three real tokenizers; ``request.param`` names the family (smollm, qwen, gemma)."""
    return request.getfixturevalue(f"{request.param}_tokenizer")


def _tiny(tokenizer, family: str, seed: int):
    from cmerl.testing import tiny_for_tokenizer

    return tiny_for_tokenizer(tokenizer, arch=FAMILIES[family][1], seed=seed)


@pytest.fixture(scope="session")
def tiny_llama(smollm_tokenizer):
    return _tiny(smollm_tokenizer, "smollm", 0)


@pytest.fixture(scope="session")
def tiny_qwen(qwen_tokenizer):
    return _tiny(qwen_tokenizer, "qwen", 0)


@pytest.fixture(scope="session")
def tiny_gemma(gemma_tokenizer):
    return _tiny(gemma_tokenizer, "gemma", 0)


def _tiny_verifier(tokenizer, family: str):
    from cmerl.scoring import Verifier

    model = _tiny(tokenizer, family, 1)
    with torch.no_grad():  # peaked next-token distributions (entropy well below log V), like a trained LM
        model.get_output_embeddings().weight.mul_(PEAK_SCALE)
    return Verifier(model, tokenizer, name=f"tiny-{family}-verifier")


@pytest.fixture(scope="session")
def tiny_llama_verifier(smollm_tokenizer):
    return _tiny_verifier(smollm_tokenizer, "smollm")


@pytest.fixture(scope="session")
def tiny_qwen_verifier(qwen_tokenizer):
    return _tiny_verifier(qwen_tokenizer, "qwen")


@pytest.fixture(scope="session")
def tiny_gemma_verifier(gemma_tokenizer):
    return _tiny_verifier(gemma_tokenizer, "gemma")


@pytest.fixture(scope="session", params=["llama", "qwen", "gemma"])
def tiny_verifier(request):
    """One of the three tiny verifiers; ``request.param`` is llama, qwen or gemma."""
    return request.getfixturevalue(f"tiny_{request.param}_verifier")


@pytest.fixture(scope="session")
def smollm_verifier_fp32():
    from cmerl.scoring import Verifier

    return Verifier.from_pretrained(SMOLLM, dtype="float32")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cmerl-cache"
    monkeypatch.setenv("CMERL_CACHE", str(cache))
    return cache


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread: tiny models gain nothing from a second one, and spin-waiting
    OpenMP threads slow down badly on a machine shared with other jobs. Restores the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
