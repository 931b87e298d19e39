"""Reward functions of the user's own for tests/test_rl_rewards.py (imported by path in the workers)."""

import os
import time


def length(response, item):
    return float(len(response))


def raises(response, item):
    raise ValueError(f"cannot score {response!r}")


def sleeps(response, item):
    """Hangs on the response "wait", else the length."""
    if response == "wait":
        time.sleep(60)
    return float(len(response))


def text(response, item):
    return "high"


def nan(response, item):
    return float("nan")


def dies(response, item):
    os._exit(7)


NOT_CALLABLE = 3


def e_share(response, item):
    """The share of the response's characters that are "e": a reward any policy can learn in a few steps."""
    return response.count("e") / max(len(response), 1)


def gated(response, item):
    """e_share, held while the file item["gate"] exists (and saying so in item["gate"] + ".held"): while it is held,
    the rollout worker that asked keeps the samples as work in flight."""
    while os.path.exists(item["gate"]):
        open(item["gate"] + ".held", "w").close()
        time.sleep(0.05)
    return e_share(response, item)


def naps(response, item):
    """Sleeps `item["nap"]` seconds, then the length (the reward service's concurrency test)."""
    time.sleep(item["nap"])
    return float(len(response))


def sandboxed(response, item):
    """Runs the response as code in the sandbox: 1 if it ran to its end, else 0 with the sandbox's reason."""
    from glm5_jax.rl import rewards, sandbox

    result = sandbox.run(response, time_limit=10)
    return rewards.Score(1.0 if result.ok else 0.0, result.reason)
