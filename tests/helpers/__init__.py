"""Helpers the test files share (no test file imports another): `ROOT` is the repository."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
