"""cmerl: label-free reinforcement learning of language models with Cross-Model Entropy (CME) rewards.

The reward of a response is its mean per-token log-likelihood under a separate, frozen verifier model,
given the prompt. Entry points: :mod:`cmerl.scoring` (the verifier engine), :mod:`cmerl.rewards` (TRL
reward functions), :mod:`cmerl.training` (the GRPO recipe), and the ``cmerl`` command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cmerl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
