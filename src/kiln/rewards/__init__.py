"""Verifiable rewards for `kiln rl`: the default tasks' reward functions (`kiln.rewards.code`), the
text-overlap metric they share with SFT's evaluation (`kiln.rewards.text`), the sandbox that runs
model-written code (`kiln.rewards.sandbox`) and the runner that scores one completion with a time
limit (`kiln.rewards.runner`). Below the data layer: it imports only kiln.config, kiln.errors and
kiln.runs."""
