"""The reward registry: the names a config's ``rewards: [...]`` may use, each mapped to a factory.

TRL's convention (``trl/scripts/grpo.py``'s ``reward_funcs_registry``) maps a name to a reward function, so
adding a reward is one entry. cmerl's rewards need models, so a name maps to a *factory*: a function that
receives a :class:`RewardContext` (the run config, the live policy and the run's shared, lazily built
scorers) and returns a TRL reward callable: ``reward(prompts=, completions=, completion_ids=, **kwargs) ->
list[float | None]``, with ``__name__`` set to the registered name (TRL logs ``rewards/<name>/mean``) and a
docstring saying what it computes.

Register a reward next to its definition::

    from cmerl.training.reward_registry import register_reward

    @register_reward("length", help="completion length in characters (a toy)")
    def length_factory(ctx):
        def length(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        return length

The registering module must be imported before a config is validated. The built-in rewards are
registered by :mod:`cmerl.training.reward_setup`, which importing ``cmerl.training`` (or any of its
modules) imports; a module elsewhere is imported from there.

This module imports nothing of cmerl at run time, so the config can validate names against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cmerl.training.config import TrainConfig

#: Names cmerl adds to TRL's reward list itself (the repetition guard); a registered reward may not use them.
RESERVED_NAMES = ("repetition_guard",)


class RewardContext(Protocol):
    """What a reward factory may use. Scorers are built on first use and shared: ``cme`` and
    ``reverse_kl`` in one run load the verifiers once."""

    cfg: TrainConfig
    policy_model: Any
    policy_tokenizer: Any

    def verifiers(self) -> list[Any]:
        """The scorers of ``cfg.verifiers`` (local verifiers or remote clients), in config order."""
        ...

    def policy_scorer(self) -> Any:
        """The scorer of the policy-side terms: the live policy or its frozen copy (``cfg.baseline_scorer``)."""
        ...


RewardFactory = Callable[[RewardContext], Callable[..., list]]


@dataclass(frozen=True)
class RewardEntry:
    """One registered reward.

    name: the config name (also the TRL metric name).
    factory: builds the reward callable for a run.
    help: one line for ``--check``, run cards and docs.
    uses_verifiers: reads ``cfg.verifiers`` (validated: at least one, independent of the policy).
    uses_policy: scores with the policy itself (``baseline_scorer``).
    """

    name: str
    factory: RewardFactory
    help: str
    uses_verifiers: bool = False
    uses_policy: bool = False

    def build(self, ctx: RewardContext) -> Callable[..., list]:
        """The reward callable for one run; its ``__name__`` is set to :attr:`name` when the factory left
        another one (TRL names metrics after it)."""
        fn = self.factory(ctx)
        if getattr(fn, "__name__", None) != self.name:
            try:
                fn.__name__ = self.name
            except (AttributeError, TypeError):
                raise TypeError(f"reward factory for {self.name!r} returned {type(fn).__name__}, whose __name__ "
                                "cannot be set; return a function or an object with a settable __name__") from None
        return fn


#: name -> entry, in registration order (built-ins first).
REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, *, help: str, uses_verifiers: bool = False, uses_policy: bool = False,
                    replace: bool = False) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: register ``factory`` under ``name`` (see the module docstring). Raises ValueError for a
    name that is not an identifier, is reserved, or is taken (unless ``replace=True``)."""

    def decorate(factory: RewardFactory) -> RewardFactory:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"reward name must be an identifier (got {name!r})")
        if name in RESERVED_NAMES:
            raise ValueError(f"reward name {name!r} is reserved by cmerl")
        if name in REWARDS and not replace and REWARDS[name].factory is not factory:
            raise ValueError(f"a reward named {name!r} is already registered; pass replace=True to override it")
        REWARDS[name] = RewardEntry(name=name, factory=factory, help=help, uses_verifiers=uses_verifiers,
                                    uses_policy=uses_policy)
        return factory

    return decorate


def reward_names() -> tuple[str, ...]:
    """Registered reward names, in registration order."""
    return tuple(REWARDS)


def get_reward(name: str) -> RewardEntry:
    """The entry registered under ``name``; ValueError naming the known rewards otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; use any of {', '.join(REWARDS)}") from None
