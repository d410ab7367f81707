"""Register the best logged model of an experiment (or of one sweep) in the MLflow model registry.

`python -m runner.register experiment=runner [sweep=<sweep_id>] [role=member] [data=<option>]
[param.<key>=<value> ...] [metric=val/acc] [mode=max] name=<registered model> alias=champion
[mix_data=false] [tracking_uri=...]`

`metric` defaults to val/acc (members log it as they train): selecting on a test metric works but
warns (the chosen model's test number is then optimistic). Models of different data
(`choice/data`, `data._target_`, `data.path`, ...) are refused in one selection unless `mix_data=true`:
narrow with `data=<option>` or any param, e.g. `param.choice/model=minilm`.

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
KEYS = ("experiment", "sweep", "role", "metric", "mode", "name", "alias", "tracking_uri", "data", "mix_data")
REQUIRED = ("experiment", "name")
DEFAULT_METRIC = "val/acc"  # select on validation: a model picked on test has seen the test set
ANY_ROLE = ("null", "none", "any", "")


def parse_args(argv: list[str]) -> dict[str, Any]:
    """key=value arguments into register_best's keyword arguments (role=null/any: every role)."""
    args: dict[str, Any] = {}
    where: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key.startswith("param.") and len(key) > len("param."):
            where[key.removeprefix("param.")] = value
            continue
        check(
            bool(sep) and key in KEYS,
            key if sep else item,
            value if sep else None,
            f"key=value with keys {list(KEYS)} or param.<key>=<value>",
        )
        args[key] = value
    if "data" in args:
        where["choice/data"] = args.pop("data")
    if where:
        args["where"] = where
    mix = str(args.pop("mix_data", "false")).lower()
    check(mix in ("true", "false"), "mix_data", mix, ["true", "false"])
    args["mix_data"] = mix == "true"
    args.setdefault("metric", DEFAULT_METRIC)
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
        if args["metric"].startswith("test/"):
            print(
                f"register: warning: selecting on {args['metric']} picks the model that did best on the test "
                "set, so its test number is no longer an unbiased estimate; select on val/* (the default "
                "val/acc) and report test",
                file=sys.stderr,
            )
        version, run_id, value = register_best(**args)
    except ConfigError as e:
        print(f"register: error: {e}", file=sys.stderr)
        sys.exit(2)
    alias = args.get("alias", "champion")
    print(
        f"registered {args['name']} version {version.version} as @{alias}: run {run_id}, "
        f"{args['metric']}={value:.6g} ({args.get('mode', 'max')})"
    )


if __name__ == "__main__":
    from runner.quiet import quiet_libraries  # the command's entry only

    quiet_libraries()
    main()
