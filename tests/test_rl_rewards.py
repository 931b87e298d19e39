"""Rewards: the built-ins on good and bad answers, load_reward's one-line errors, and the worker pool turning
a raising, hanging, dying or non-number reward into a failed sample while the rest still score."""

import pytest

from glm5_jax.errors import ConfigError
from glm5_jax.rl import rewards
from glm5_jax.rl.rewards import Score


def test_exact_match_compares_the_final_answer():
    item = {"prompt": "2 + 2?", "answer": " 4 "}
    assert rewards.exact_match("Two and two... Answer: 4\n", item) == 1.0
    assert rewards.exact_match("4", item) == 1.0
    assert rewards.exact_match("answer: 3. Final answer: 5", item) == 0.0
    assert rewards.exact_match("answer: 4 apples", item) == 0.0


def test_math_verify_checks_equivalent_answers():
    item = {"prompt": "half?", "answer": "\\frac{1}{2}"}
    assert rewards.math_answer("0.5", item) == Score(1.0)
    assert rewards.math_answer("So the result is $\\frac{2}{4}$.", item) == Score(1.0)
    assert rewards.math_answer("0.6", item) == Score(0.0)
    assert rewards.math_answer("0.5", {"answer": ""}) == Score(None, "the answer '' does not parse")


def test_code_runs_the_answer_then_the_tests_in_the_sandbox():
    item = {"prompt": "write add", "tests": "assert add(2, 3) == 5\n", "time_limit": 5}
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert rewards.code(good, item) == Score(1.0, "")
    wrong = rewards.code("def add(a, b):\n    return a - b\n", item)
    assert wrong == Score(0.0, "exit status 1: AssertionError")
    hang = rewards.code("def add(a, b):\n    while True: pass\n", {**item, "time_limit": 1})
    assert hang == Score(0.0, "time limit 1 s exceeded")
    for cheat, reason in (("import sys\nsys.exit(0)\n", "the answer exited (line 2) before the tests ran"),
                          ("import os\nos._exit(0)\n", "exit status 0 before the end of the code (os._exit)")):
        assert rewards.code(cheat, item) == Score(0.0, reason)
    unit = {**item, "tests": "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n"
                             "        self.assertEqual(add(1, 1), 2)\nunittest.main()\n"}
    assert rewards.code(good, unit) == Score(1.0, "")


def test_load_reward_names_the_key_the_path_and_the_cause():
    assert rewards.load_reward("code") is rewards.code
    assert rewards.load_reward("tests.reward_fns:length")("abc", {}) == 3.0
    cases = {
        "mypkg.rewards:score": "rl.reward: mypkg.rewards:score: no module named 'mypkg'",
        "tests.reward_fns:missing": "rl.reward: tests.reward_fns:missing: tests.reward_fns has no attribute "
                                    "'missing'",
        "tests.reward_fns:NOT_CALLABLE": "rl.reward: tests.reward_fns:NOT_CALLABLE: a int, not a function",
        "exact": "rl.reward: 'exact': neither a built-in reward (code, exact_match, math, similarity) nor a "
                 "package.module:function path",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError) as e:
            rewards.load_reward(spec)
        assert str(e.value) == message
        assert "\n" not in message


def test_to_score_refuses_non_numbers():
    assert rewards.to_score(1) == Score(1.0)
    assert rewards.to_score("1") == Score(None, "the reward is a str, not a number")
    assert rewards.to_score(float("inf")) == Score(None, "non-finite reward inf")


def test_the_pool_fails_samples_not_the_run_and_keeps_order():
    jobs = [(text, {"prompt": "p"}) for text in ("a", "bbb", "cc")]
    with rewards.RewardPool("tests.reward_fns:length", workers=2, timeout=5) as pool:
        assert pool.score(jobs) == [Score(1.0), Score(3.0), Score(2.0)]
        assert pool.score(jobs[::-1]) == [Score(2.0), Score(3.0), Score(1.0)]
    for spec, reason in (("raises", "ValueError: cannot score 'a'"), ("text", "the reward is a str, not a number"),
                         ("nan", "non-finite reward nan"), ("dies", "the reward worker died (exit code 7)")):
        assert rewards.score_all(f"tests.reward_fns:{spec}", jobs[:1], timeout=5, workers=1) == [Score(None, reason)]


def test_a_hanging_reward_times_out_and_later_samples_still_score():
    jobs = [(text, {}) for text in ("wait", "bb", "wait", "dddd", "e")]
    with rewards.RewardPool("tests.reward_fns:sleeps", workers=2, timeout=0.5) as pool:
        timed_out = Score(None, "timed out after 0.5 s")
        assert pool.score(jobs) == [timed_out, Score(2.0), timed_out, Score(4.0), Score(1.0)]
        assert pool.score(jobs[1:2]) == [Score(2.0)]
