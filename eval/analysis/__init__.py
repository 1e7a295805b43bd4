"""Analyses beyond the main table (POS surprisal, layer sweeps, training dynamics,
non-grammatical lm_eval tasks).

Each module holds its logic plus a ``register(app)`` that adds its typer command to
``negablate analyze``; like the rest of ``eval``, they talk to the model only over
the server's HTTP API.
"""
