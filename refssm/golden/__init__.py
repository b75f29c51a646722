"""Golden fixtures: the suite other implementations test against (DESIGN.md section 5)."""
from .fixture import (FORMAT_VERSION, check_callable, Fixture, FixtureError, compare_tensors, format_compare,
                      read_fixture, write_fixture)
from .suite import SUITE, TOLERANCES, write_suite

__all__ = ["FORMAT_VERSION", "check_callable", "Fixture", "FixtureError", "compare_tensors", "format_compare",
           "read_fixture", "write_fixture", "SUITE", "TOLERANCES", "write_suite"]
