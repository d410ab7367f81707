"""The short table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping

COLUMNS = {
    "acc": "acc",
    "f1": "f1",
    "nll": "nll",
    "ece": "ece",
    "params": "params",
    "nonzero_params": "nonzero",
    "size_bytes": "size_kB",
    "latency_ms": "latency_ms",
    "delta/acc": "d_acc",
    "compression_ratio": "ratio",
    "speedup": "speedup",
    "gain/acc": "gain_acc",
    "gain/nll": "gain_nll",
    "export/agreement": "export_agree",
    "export/latency_ms": "export_ms",  # eval.export
    # causal LMs (runner.lm)
    "perplexity": "ppl",
    "delta/perplexity": "d_ppl",
    "next_token_acc": "next_tok_acc",
    "tokens_per_s": "tok_s",
    "weight_mb": "weight_MB",
    "eval_peak_mb": "peak_MB",
}


def _fmt(column: str, value: float) -> str:
    if column in ("params", "nonzero_params"):
        return f"{int(value):,}"
    if column == "size_bytes":
        return f"{value / 1000:.1f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """One row per model, the columns of COLUMNS that any row has."""
    columns = [c for c in COLUMNS if any(c in r for r in rows.values())]
    header = ["model"] + [COLUMNS[c] for c in columns]
    body = [[name] + [_fmt(c, r[c]) if c in r else "-" for c in columns] for name, r in rows.items()]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(row):
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])
