"""Human preference labelling: pairs of completions in SQLite, a web page for labellers, preference JSONL out.

`db` holds the data (pairs, labellers, the order each saw, votes), `agreement` the kappa
statistics, `app` the FastAPI server and its page (`static/`), `cli` the `kiln label` sub-commands.
"""
