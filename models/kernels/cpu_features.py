"""What this CPU has, read once from the operating system: vendor, ISA feature flags, cores (for choices.py).

Linux: /proc/cpuinfo's `vendor_id` and `flags` of the first processor (the kernel's names: avx2, avx512f,
amx_tile, amx_bf16, ...) and the CPUs this process may run on. Elsewhere (or unreadable): no vendor and no
flags, which choices.py maps to the plain PyTorch paths. Nothing is timed: the same machine reads the same.
"""
import os
from dataclasses import dataclass
from typing import FrozenSet

__all__ = ['CpuFeatures', 'read_cpu_features', 'parse_cpuinfo']

CPUINFO = '/proc/cpuinfo'


@dataclass(frozen=True)
class CpuFeatures:
    """vendor: 'AuthenticAMD', 'GenuineIntel', ... or '' when unknown; flags: ISA feature names; cores: CPUs usable."""
    vendor: str
    flags: FrozenSet[str]
    cores: int

    def describe(self) -> str:
        isa = ', '.join(f for f in ('avx2', 'avx512f', 'amx_tile', 'amx_bf16') if f in self.flags) or 'none of avx2/avx512f/amx'
        return f'{self.vendor or "unknown vendor"}, {isa}, {self.cores} cores'


def parse_cpuinfo(text: str, cores: int) -> CpuFeatures:
    """CpuFeatures from the text of /proc/cpuinfo (its first processor's vendor_id and flags)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(':')
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return CpuFeatures(vendor=fields.get('vendor_id', ''), flags=frozenset(fields.get('flags', '').split()), cores=cores)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


def read_cpu_features() -> CpuFeatures:
    """This machine's CpuFeatures; without a readable /proc/cpuinfo no vendor and no flags."""
    try:
        with open(CPUINFO) as f:
            text = f.read()
    except OSError:
        text = ''
    return parse_cpuinfo(text, _usable_cores())
