"""Shared helpers for the DaViT tests: ISA switching and derived tolerances."""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_ext import _core
from native_helpers import ALL_ISAS, use_isa

ISAS = list(ALL_ISAS)


def isa_path(name: str):
    """Force a kernel path for a with-block; skip (with the reason) when this CPU lacks it."""
    if name not in _core.supported_isas():
        pytest.skip(f"this CPU has no {name} path (supported: {_core.supported_isas()})")
    return use_isa(name)


def max_err(a, ref) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(ref, dtype=np.float64))))


def assert_derived(native, ref64, torch32, factor: float = 4.0, what: str = "") -> None:
    """The kernel's error against the float64 reference must be within `factor` times
    PyTorch fp32's own error on the same problem (plus a floor of a few fp32 ulps of the
    output's scale, for problems where PyTorch happens to be nearly exact)."""
    ref = np.asarray(ref64, dtype=np.float64)
    e_native, e_torch = max_err(native, ref), max_err(torch32, ref)
    floor = 4 * np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(ref))))
    bound = factor * e_torch + floor
    assert e_native <= bound, f"{what}: error {e_native:.3e} > {bound:.3e} (torch fp32 error {e_torch:.3e})"
