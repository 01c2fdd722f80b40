"""The former name of tests/harness.py, kept so that existing imports keep working."""
from harness import INPUT_KINDS, KINDS, TOLERANCES, check_against_oracle, make_inputs, rel, relative_error

__all__ = ["INPUT_KINDS", "KINDS", "TOLERANCES", "check_against_oracle", "make_inputs", "rel", "relative_error"]
