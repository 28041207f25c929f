"""Scoring one completion with a verifiable reward (`rl.reward`, a `module:function` name): the
function resolved, called with a time limit, and whatever it returns or raises turned into
(value, reason), so one bad completion or reward never stops a run. `kiln rl` runs `score_job`
through its executor (in this process, local workers or Ray tasks).
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import sys
import threading

from kiln.config import SandboxConfig
from kiln.errors import KilnError


class RewardTimeout(BaseException):
    """Raised in a reward call that ran past its time (a BaseException: `except Exception` in the
    reward does not swallow it)."""


def _resolve_reward(spec: str):
    """The reward function `module:function` names; a module in the working directory (where a
    user writes `my_rewards.py`) imports as one on the path would, as `python -m` finds it."""
    module, _, name = spec.partition(":")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)  # after everything installed: a local file never shadows a library
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise KilnError(f"rl.reward={spec!r} cannot be imported ({e}); give module:function, e.g. "
                        "kiln.rewards.code:code_reward") from None
    if not callable(fn):
        raise KilnError(f"rl.reward={spec!r} is not a function")
    return fn


def _call_with_timeout(fn, timeout_s: float, kwargs: dict):
    """`fn(**kwargs)`, stopped after `timeout_s` (SIGALRM on the main thread; elsewhere a helper
    thread is abandoned to finish on its own)."""
    if threading.current_thread() is threading.main_thread():
        def on_alarm(signum, frame):
            raise RewardTimeout

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(**kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box: list = []
    worker = threading.Thread(target=lambda: box.append(_capture(fn, kwargs)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not box:
        raise RewardTimeout
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _capture(fn, kwargs):
    try:
        return True, fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - handed to the caller
        return False, e


def score_job(job: dict) -> tuple[float, str]:
    """One reward: (value, reason). A reward that raises, hangs past its time or returns something
    that is not a finite number scores 0 with the reason counted; the run goes on."""
    fn = _resolve_reward(job["reward"])
    kwargs = {**job["fields"], "prompt": job["prompt"], "completion": job["completion"],
              "sandbox": SandboxConfig(**job["sandbox"])}
    try:
        value = _call_with_timeout(fn, job["timeout_s"], kwargs)
    except RewardTimeout:
        return 0.0, "reward_timeout"
    except Exception:  # noqa: BLE001 - a user's reward function failing on one completion
        return 0.0, "reward_error"
    reason = "scored"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        value, reason = value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0, "reward_not_a_number"
    if not math.isfinite(value):
        return 0.0, "reward_nan"
    return value, reason
