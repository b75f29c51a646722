"""Importing refssm shortens GNU OpenMP's idle spin unless the user chose a policy.

Why (measured in ``refssm/__init__``'s docstring): Numba's OpenMP workers spinning
after each kernel took the cores from NumPy's BLAS between kernels, 2-3x on the
models' "numba" forward.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _spincount_after_import(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c",
         "import os, refssm; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"],
        env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("env, expected", [
    ({}, "10000"),                              # nobody chose: refssm's short spin
    ({"GOMP_SPINCOUNT": "5"}, "5"),             # the user's own count stays
    ({"OMP_WAIT_POLICY": "active"}, "unset"),   # the user's policy decides
])
def test_import_sets_a_short_openmp_spin_unless_the_user_chose(env, expected):
    assert _spincount_after_import(**env) == expected
