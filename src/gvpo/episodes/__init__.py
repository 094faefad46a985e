"""Multi-turn, tool-using episodes in TRL 1.16's conventions, exact by masking, token in and token out.

Set ``task.environment=pkg.mod.Class`` (TRL's ``environment_factory``: ``reset(**row)``, public methods as
tools, optional ``get_reward()``) and/or ``task.tools=[pkg.mod.fn]`` (TRL's ``tools=``); every sampler that
generates (``policy``, ``reference``, ``replay``, ``mixture``'s fresh part) and ``gvpo eval`` then run episodes
(:mod:`.runner`), and a prompt's ``k`` episodes form its group.

Why GVPO stays exact. An episode is ``tau = (x, a_1, o_1, ..., a_T)``, model turns ``a_t`` and observations
``o_t``. Its probability under a policy is ``prod_t pi(a_t | x, a_<t, o_<t) * P(o_t | x, a_<=t, o_<t)``, and the
environment's factor ``P`` is the same under pi_theta and pi_ref, so

    log pi_theta(tau) - log pi_ref(tau) = sum over the model's tokens of (log pi_theta - log pi_ref).

A completion is the packed token stream after the prompt, ``action_mask`` marks the model's tokens, and every
objective sums over ``action_mask`` only (:mod:`gvpo.objectives.base`): ``gvpo_loss`` is unchanged, with that
masked sum as the sequence log-prob. Masking the observations is exact, not an approximation.

- Deterministic observations (``o_t`` a function of the history: calculators, code execution, look-ups): an
  episode is determined by its actions, the KL-regularised problem over episodes is the single-turn problem
  with ``y = (a_1, ..., a_T)``, and Theorem 3.1 carries over: the unique minimiser is
  ``pi*(tau|x) = pi_ref(tau|x) exp(R(tau)/beta) / Z(x)``, and the policy reaches it turn by turn
  (``tests/test_episodes_theory.py`` reaches it on a tabular two-turn MDP, exactly and by sampled training).
- Stochastic observations (user simulators, noisy APIs): ``R_theta(tau) = beta log(pi_theta/pi_ref)`` sees
  only the policy's factors, so no policy makes ``R_theta - R`` constant over episodes and the minimiser is a
  projection, not pi*. At pi* (the backward-induction optimum) an episode's residual is
  ``beta (E_o log Z - log Z(o))``: zero on average over ``o``, so the turns before ``o`` are at their optimum,
  but the turns after it can lower the loss by absorbing part of it; the minimiser tilts them, keeps a
  positive loss, and depends on the sampling distribution pi_s
  (``tests/test_episodes_theory.py::test_stochastic_observations_give_a_projection_not_pi_star`` pins the
  numbers on a two-turn MDP: KL(pi* || minimiser) = 0.004 nats per prompt there).

What peers' users hit, and what gvpo does: a generated turn is never re-tokenised (only the tool messages'
suffix ids are appended, TRL's ``_get_tool_suffix_ids``); ``action_mask`` is a loss mask only, never the
attention mask; it is applied on every code path (all objectives, metrics, ``reference: rollout``); the budget
cuts an episode before an observation that would not fit, never inside one.
"""

from __future__ import annotations

from .environments import EnvironmentSpec, ToolFailure, call_limited, load_environment_spec, task_environment
from .records import environment_reward, episode_groups, episode_metrics, reward_keywords
from .runner import Episode, EpisodeEngine

__all__ = ["Episode", "EpisodeEngine", "EnvironmentSpec", "ToolFailure", "call_limited", "environment_reward",
           "episode_groups", "episode_metrics", "load_environment_spec", "reward_keywords", "task_environment",
           "task_rewards",
           "with_episodes"]


def with_episodes(engine, tokenizer, spec: EnvironmentSpec | None, rollout_config):
    """``engine`` wrapped to run episodes when there is an environment or tools (``spec``, from
    :func:`load_environment_spec`; a tokenizer that cannot parse tool calls is a one-line ConfigError), with
    ``rollout.max_turns`` and ``rollout.max_observation_tokens``; ``engine`` itself when ``spec`` is ``None``."""
    if spec is None:
        return engine
    if spec.has_tools:
        from .chat import check_tool_template

        check_tool_template(tokenizer)
    return EpisodeEngine(engine, spec, max_turns=rollout_config.max_turns,
                         max_observation_tokens=rollout_config.max_observation_tokens)


def task_rewards(task_config, task, spec: EnvironmentSpec | None) -> tuple[list, list | None]:
    """The run's rewards and weights: ``task.rewards`` (else the task's own), plus the environment's
    ``get_reward()`` with weight 1 when its class has one (TRL adds it the same way)."""
    names = list(task_config.rewards or task.rewards)
    weights = task_config.reward_weights or (None if task_config.rewards else task.reward_weights)
    if spec is None or not spec.has_reward:
        return names, weights
    return names + [environment_reward(spec)], list(weights or [1.0] * len(names)) + [1.0]
