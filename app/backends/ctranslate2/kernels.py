"""CTranslate2's CPU kernel choice, made explicitly at startup (and by benchmarks), before
CTranslate2 is loaded: the library reads `CT2_FORCE_CPU_ISA` once, when it loads.

On Intel CPUs CTranslate2 multiplies int8 matrices with MKL, and there, with its AVX2/AVX-512
kernels preparing the operands, replies came out wrong: on a Xeon with AVX-512 VNNI, "What is
the capital of France?" got "L'Étoile, la Marseillaise, ..." where float32 says Paris. Its
generic kernels with the same MKL answer right (slower: BENCHMARKS.md); AMD CPUs use oneDNN
and are not affected. A `CT2_FORCE_CPU_ISA` of the user's own wins.
"""

from __future__ import annotations

import os
import sys

ISA_ENV = "CT2_FORCE_CPU_ISA"


def _intel() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


def choose_cpu_kernels() -> str | None:
    """Set the kernel choice for this CPU and return it (None: CTranslate2's own). Raises
    `RuntimeError` if CTranslate2 is already loaded with another choice: its replies could
    be wrong, and only a new process can change it."""
    wanted = os.environ.get(ISA_ENV) or ("GENERIC" if _intel() else None)
    if "ctranslate2" in sys.modules and os.environ.get(ISA_ENV) != wanted:
        raise RuntimeError(
            f"CTranslate2 was loaded before its CPU kernels were chosen (it needs "
            f"{ISA_ENV}={wanted} on this CPU): call choose_cpu_kernels() before importing it"
        )
    if wanted is not None:
        os.environ[ISA_ENV] = wanted
    return wanted
