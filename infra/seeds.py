"""One seed-derivation rule for everything that needs reproducible randomness."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``("generate", seed, index, attempt)``): stable across
    runs, processes and machines, and independent for different parts."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
