"""runner: config-driven experiments in model compression and fusion (`python -m runner`).

`runner.load(uri)` brings back a model a job logged to MLflow (runner/serve.py).
"""


def __getattr__(name: str):
    if name in ("load", "ShippedModel"):  # lazily: `python -m runner` imports no torch before it needs it
        from runner import serve

        return getattr(serve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ShippedModel", "load"]
