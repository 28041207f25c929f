"""`ranged`: how a config section declares a numeric key's bounds (`kiln.config.build` checks them).

It lives apart from the loader (`kiln/config/__init__.py`) so that the section modules, which the
loader imports, can declare their keys without importing it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


def ranged(default=dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, default_factory=dataclasses.MISSING):
    """A dataclass field whose value `build` checks against bounds: `max_steps: int = ranged(1000, ge=1)`.

    Every numeric key of every verb declares its range this way, so a bad value stops at load
    time with one line (`config key 'train.max_steps' = -5 must be ≥ 1`) instead of training
    nothing, dividing by zero or sampling garbage further on.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, default_factory=default_factory, metadata={"range": bounds})
