"""OpenRLHF reward-function file for CME: ``--reward.remote_url examples/openrlhf/reward_func.py``.

Configure the verifier with environment variables carried by the Ray job (see
cmerl.integrations.openrlhf_reward_func): CMERL_SERVER_URL (recommended) or CMERL_VERIFIER, and
CMERL_PROMPT_MODE (chat, label, verbatim).
"""

from cmerl.integrations.openrlhf_reward_func import reward_func  # noqa: F401
