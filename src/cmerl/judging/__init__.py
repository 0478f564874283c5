"""Pairwise judges: a local causal LM or an OpenAI-compatible endpoint compares two responses, both orders.

Vocabulary: the two *systems* being compared are ``a`` and ``b`` (the A and B outputs files); the two
*positions* in the judge prompt are ``A`` (shown first) and ``B``. Every pair is judged twice, in order
``ab`` (system a shown as Response A) and ``ba`` (system b shown as Response A).

How one order is judged:

* **Log-prob mode** (local models; endpoints that return logprobs): the assistant turn is pre-filled with
  the prompt file's prefill ("The better response is Response") and the judge's log-probs of the two
  choice tokens ``" A"`` and ``" B"`` are read. The order's margin for system a is ``logprob_A - logprob_B``
  in order ``ab`` and ``logprob_B - logprob_A`` in order ``ba``; the pair's margin is their sum (nats of
  log-odds), which cancels a constant position bias.
* **Parse mode** (endpoints without logprobs): the judge's text must say "The better response is
  Response A|B" (or be the bare letter); anything else is retried once and then recorded as an error.

Decision (MT-Bench convention, :class:`DecisionRule`): in log-prob mode the pair goes to the system its
summed margin favours unless ``|margin| < threshold`` (then a tie), and, with ``require_consistent``,
unless the two orders disagree (also a tie). In parse mode the two orders must agree, else it is a tie.
An error in either order makes the pair an error: excluded from win rates, never a win.

The package, by concern (everything is re-exported here: ``from cmerl.judging import run_judge``):

* :mod:`~cmerl.judging.prompt`: the prompt file, verdict parsing, one call (:class:`Job`) and its
  :class:`OrderResult`, the :class:`Judge` protocol, and the decision rule (:func:`decide`);
* :mod:`~cmerl.judging.local`: :class:`LocalJudge`, a causal LM in log-prob mode;
* :mod:`~cmerl.judging.api`: :class:`OpenAIJudge` and :func:`judge_concurrently` for API judges;
* :mod:`~cmerl.judging.run`: pairs, the verdicts file and the resumable :func:`run_judge` loop;
* :mod:`~cmerl.judging.spec`: :class:`JudgeSpec`, a judge built from command-line flags.
"""

from cmerl.judging.api import JudgeConnectionError, OpenAIJudge, judge_concurrently
from cmerl.judging.local import LocalJudge
from cmerl.judging.prompt import (
    DEFAULT_MAX_RESPONSE_CHARS,
    DEFAULT_PROMPT,
    DEFAULT_THRESHOLD,
    TRUNCATION_MARK,
    DecisionRule,
    Job,
    Judge,
    JudgePrompt,
    Letter,
    OrderResult,
    decide,
    order_margin,
    parse_verdict,
    preferred_system,
    read_prompt_sections,
    truncate_response,
)
from cmerl.judging.run import (
    VERDICTS_KIND,
    Pair,
    judge_key,
    judge_pairs,
    load_pairs,
    pair_sha256,
    read_verdicts,
    run_judge,
    verdicts_header,
)
from cmerl.judging.spec import JudgeSpec

__all__ = [
    "DEFAULT_MAX_RESPONSE_CHARS", "DEFAULT_PROMPT", "DEFAULT_THRESHOLD", "TRUNCATION_MARK", "VERDICTS_KIND",
    "DecisionRule", "Job", "Judge", "JudgeConnectionError", "JudgePrompt", "JudgeSpec", "Letter", "LocalJudge",
    "OpenAIJudge", "OrderResult", "Pair", "decide", "judge_concurrently", "judge_key", "judge_pairs",
    "load_pairs", "order_margin", "pair_sha256", "parse_verdict", "preferred_system", "read_prompt_sections",
    "read_verdicts", "run_judge", "truncate_response", "verdicts_header",
]
