"""verl custom reward file for CME. Point verl at it:

    reward.custom_reward_function.path=examples/verl/cme_reward.py
    reward.custom_reward_function.name=compute_score_async     # or compute_score (sync)
    +reward.custom_reward_function.reward_kwargs.server_url=http://VERIFIER_HOST:8000

See cmerl.integrations.verl for the arguments (server_url, verifier, tokenizer, protocol, signal).
"""

from cmerl.integrations.verl import compute_score, compute_score_async  # noqa: F401
