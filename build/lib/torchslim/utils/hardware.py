"""What this machine's CPU does fast: reduced-precision matrix products run in hardware on
some CPUs and are emulated, many times slower than float32, on others."""

from __future__ import annotations

import torch


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16; where
    torch cannot tell: assumed so)."""
    probes = [
        getattr(torch.cpu, name, None)
        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    ]
    known = [probe for probe in probes if probe is not None]
    return not known or any(probe() for probe in known)
