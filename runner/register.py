"""Register the best logged model of an experiment (or of one sweep) in the MLflow model registry.

`python -m runner.register experiment=runner [sweep=<sweep_id>] [role=member] metric=test/acc
[mode=max] name=<registered model> alias=champion [tracking_uri=...]`

Every evaluated model is a LoggedModel of its own child run, which carries the tag `model_uri`
(runner/tracking/models.py) and the tags `role`, `member` and, in a sweep, `sweep_id`. The best of
those runs by `metric` becomes a new version of `name`, and `alias` moves to it; the version's
tags say which run, metric and value chose it. Serve it with `runner.load` or
`mlflow.pytorch.load_model("models:/<name>@<alias>")`.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from runner.errors import ConfigError, check
from runner.tracking.registry import register_best  # the Python API

DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"  # conf/tracking/local.yaml (runner.serve's default)
KEYS = ("experiment", "sweep", "role", "metric", "mode", "name", "alias", "tracking_uri")
REQUIRED = ("experiment", "metric", "name")
ANY_ROLE = ("null", "none", "any", "")


def parse_args(argv: list[str]) -> dict[str, Any]:
    """key=value arguments into register_best's keyword arguments (role=null/any: every role)."""
    args: dict[str, Any] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        check(bool(sep) and key in KEYS, key if sep else item, value if sep else None, f"key=value with keys {list(KEYS)}")
        args[key] = value
    for key in REQUIRED:
        check(bool(args.get(key)), key, args.get(key), "a value (required)")
    if args.get("role", "").lower() in ANY_ROLE:
        args["role"] = None
    if args.get("sweep", "x").lower() in ("null", "none", ""):
        args["sweep"] = None
    args.setdefault("tracking_uri", os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    return args


def main(argv: list[str] | None = None) -> None:
    """`python -m runner.register ...`: register, then print one line; a bad value exits 2."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        version, run_id, value = register_best(**args)
    except ConfigError as e:
        print(f"register: error: {e}", file=sys.stderr)
        sys.exit(2)
    alias = args.get("alias", "champion")
    print(f"registered {args['name']} version {version.version} as @{alias}: run {run_id}, "
          f"{args['metric']}={value:.6g} ({args.get('mode', 'max')})")


if __name__ == "__main__":
    from runner.quiet import quiet_libraries

    quiet_libraries()
    main()
