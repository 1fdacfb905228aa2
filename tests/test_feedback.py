"""Learning from feedback with no env to step: decisions, feedback in any order (or never), expiry, updates, and a
restart from a checkpoint plus the SQLite journal after the process died unsaved."""
import time

import numpy as np
import pytest

from wolpertinger import Wolpertinger

BANDIT = dict(env_kwargs={"n_choices": 6, "n_profiles": 50}, k=8, bsize=8, warmup=12, hidden1=16, hidden2=16)


def bandit(**options) -> Wolpertinger:
    """An agent on Configurator-v0 with six binary choices: one-step episodes, reset observes, step rewards."""
    return Wolpertinger("Configurator-v0", **{**BANDIT, "seed": 1, **options})


def decide_and_reward(agent: Wolpertinger, n: int, **decide) -> list[tuple]:
    """n decisions on fresh observations, each with the reward the env gives its action: (decision, obs, reward)."""
    env, made = agent.env, []
    for _ in range(n):
        obs, _ = env.reset()
        decision = agent.decide(obs, **decide)
        made.append((decision, obs, float(env.step(decision.action)[1])))
    return made


def assert_stored(agent: Wolpertinger, rows: range, sent: list[tuple]) -> None:
    """The memory's rows hold the sent one-step transitions, in order: state, the action's point (a binary choice
    0/1 at -1/1), reward, next state = state, terminated."""
    memory = agent.memory
    for row, (decision, obs, reward) in zip(rows, sent, strict=True):
        np.testing.assert_array_equal(memory.states[row], obs)
        np.testing.assert_array_equal(memory.actions[row], 2.0 * decision.action - 1.0)
        assert memory.rewards[row] == np.float32(reward)
        np.testing.assert_array_equal(memory.next_states[row], obs)
        assert memory.terminated[row] == 1.0


def test_delayed_out_of_order_feedback_fills_the_memory_and_updates_learn():
    agent = bandit()
    made = decide_and_reward(agent, 20)
    assert len({d.id for d, _, _ in made}) == 20
    sent = [made[i] for i in np.random.default_rng(0).permutation(20)[:14]]  # six never answered
    for decision, _, reward in sent[:4]:
        agent.feedback(decision.id, reward, terminated=True)
    agent.feedback_many([{"decision_id": d.id, "reward": r, "terminated": True} for d, _, r in sent[4:]])
    assert len(agent.memory) == 14
    assert_stored(agent, range(14), sent)
    assert agent.feedback_stats() == {"decisions": 20, "feedback": 14, "expired_dropped": 0, "expired_defaulted": 0,
                                      "pending": 6}
    critic = agent.agent.critic.flat.numpy().copy()
    losses = agent.update(3)
    assert set(losses) == {"critic_loss", "actor_loss", "mean_q"} and np.isfinite(list(losses.values())).all()
    assert not np.array_equal(agent.agent.critic.flat.numpy(), critic)


def test_feedback_with_a_next_observation_stores_it_and_exploration_decays_per_decision():
    agent = bandit()
    before = agent.agent.epsilon
    (decision, obs, reward), (_, next_obs, _) = decide_and_reward(agent, 2)
    assert agent.agent.epsilon == pytest.approx(before - 2 / agent.options.epsilon)
    agent.feedback(decision.id, reward, next_obs=next_obs)
    np.testing.assert_array_equal(agent.memory.next_states[0], next_obs)
    assert agent.memory.terminated[0] == 0.0 and agent.memory.rewards[0] == np.float32(reward)
    agent.decide(np.stack([obs, next_obs]), explore=False)
    assert agent.agent.epsilon == pytest.approx(before - 2 / agent.options.epsilon)  # noise-free: no decay


def test_update_refuses_a_memory_smaller_than_warmup_or_bsize():
    agent = bandit()
    for decision, _, reward in decide_and_reward(agent, 10):
        agent.feedback(decision.id, reward, terminated=True)
    with pytest.raises(ValueError, match="holds 10 transitions; updates need at least warmup = 12"):
        agent.update(1)
    with pytest.raises(ValueError, match="n must be"):
        agent.update(0)
    small = bandit(warmup=0, bsize=16)
    with pytest.raises(ValueError, match="holds 0 transitions; updates need at least bsize = 16"):
        small.update(1)


@pytest.mark.parametrize("default_reward", [None, -1.5])
def test_a_decision_without_feedback_expires_dropped_or_defaulted_and_counted(default_reward):
    agent = bandit()
    agent.open_journal(feedback_wait=0.3, default_reward=default_reward)
    old = decide_and_reward(agent, 2)
    time.sleep(0.4)
    fresh = decide_and_reward(agent, 1)  # deciding closes the expired ones first
    defaulted = default_reward is not None
    assert agent.feedback_stats() == {"decisions": 3, "feedback": 0, "expired_dropped": 0 if defaulted else 2,
                                      "expired_defaulted": 2 if defaulted else 0, "pending": 1}
    if defaulted:
        assert_stored(agent, range(2), [(d, obs, default_reward) for d, obs, _ in old])
    else:
        assert len(agent.memory) == 0
    with pytest.raises(ValueError, match=f"{old[0][0].id}.*expired"):
        agent.feedback(old[0][0].id, 1.0, terminated=True)
    agent.feedback(fresh[0][0].id, fresh[0][2], terminated=True)
    assert len(agent.memory) == (3 if defaulted else 1)


def test_bad_feedback_is_a_value_error_that_changes_nothing():
    agent = bandit()
    (first, obs, reward), (second, _, _) = decide_and_reward(agent, 2)
    agent.feedback(first.id, reward, terminated=True)
    stats, stored = agent.feedback_stats(), len(agent.memory)
    bad = [({"decision_id": "no-such-id", "reward": 1.0, "terminated": True}, "'no-such-id' is unknown"),
           ({"decision_id": first.id, "reward": 1.0, "terminated": True}, "already has its feedback"),
           ({"decision_id": second.id, "reward": float("nan"), "terminated": True}, "reward for .* finite number"),
           ({"decision_id": second.id, "reward": "1", "terminated": True}, "reward for .* finite number"),
           ({"decision_id": second.id, "reward": 1.0}, "next_obs .* missing"),
           ({"decision_id": second.id, "reward": 1.0, "next_obs": obs[:3]}, "next_obs .* shape"),
           ({"decision_id": second.id, "reward": 1.0, "next_obs": np.full_like(obs, np.nan)}, "not finite"),
           ({"decision_id": second.id, "reward": 1.0, "next_obs": np.stack([obs, obs])}, "not a batch")]
    for item, message in bad:
        with pytest.raises(ValueError, match=message):
            agent.feedback(**item)
    good = {"decision_id": second.id, "reward": 1.0, "terminated": True}
    for item, message in bad[:3] + [(good, "answered twice")]:  # a batch with one bad item stores none of it
        with pytest.raises(ValueError, match=message):
            agent.feedback_many([good, item])
    assert agent.feedback_stats() == stats and len(agent.memory) == stored
    agent.feedback(**good)
    assert len(agent.memory) == stored + 1


def test_a_restart_from_the_checkpoint_and_journal_loses_and_repeats_nothing(tmp_path):
    journal, run = tmp_path / "journal", tmp_path / "run"
    agent = bandit()
    agent.open_journal(journal)
    made = decide_and_reward(agent, 10)
    for decision, _, reward in made[:4]:
        agent.feedback(decision.id, reward, terminated=True)
    agent.save(run)
    for decision, _, reward in made[4:7]:  # acknowledged after the checkpoint
        agent.feedback(decision.id, reward, terminated=True)
    del agent  # the process dies unsaved: only the checkpoint and the journal remain

    restarted = Wolpertinger.load(run)
    restarted.open_journal(journal)
    assert len(restarted.memory) == 7
    assert_stored(restarted, range(7), made[:7])
    assert restarted.feedback_stats() == {"decisions": 10, "feedback": 7, "expired_dropped": 0,
                                          "expired_defaulted": 0, "pending": 3}
    late, _, reward = made[8]  # decided before the restart
    restarted.feedback(late.id, reward, terminated=True)
    with pytest.raises(ValueError, match="already has its feedback"):
        restarted.feedback(made[5][0].id, 1.0, terminated=True)
    assert_stored(restarted, range(8), made[:7] + [made[8]])
    restarted.save(run / "again")

    again = Wolpertinger.load(run / "again")
    again.open_journal(journal)
    assert len(again.memory) == 8  # the second checkpoint holds all eight: none replayed twice
    assert_stored(again, range(8), made[:7] + [made[8]])
    again.open_journal(tmp_path / "another")  # a new journal: none of its rows are in the memory, and it has none
    assert len(again.memory) == 8 and again.feedback_stats()["decisions"] == 0
