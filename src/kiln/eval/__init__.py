"""How good a model is: `kiln eval` (`evaluate`), scoring and greedy generation on a loaded model
(`scoring`), the lm-evaluation-harness adapter (`harness`), models side by side (`compare`)."""
