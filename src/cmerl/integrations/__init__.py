"""Adapters for training frameworks, written against their protocols without importing them.

* :mod:`cmerl.integrations.verl`: ``compute_score`` (sync and async) and ``prepare_dataset``.
* :mod:`cmerl.integrations.openrlhf`: the ``/get_reward`` protocol; ``openrlhf_reward_func.py`` for
  ``--reward.remote_url path.py``.
* :mod:`cmerl.integrations.trl`: :class:`AsyncCrossModelEntropy`, an async TRL reward function.
* :mod:`cmerl.integrations.common`: which scorer an adapter uses (server URL or local verifier).
"""
