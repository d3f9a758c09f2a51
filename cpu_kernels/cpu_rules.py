"""What this CPU has (vendor, ISA feature flags, cores) and the one table of rules that picks, from that alone, which
CPU-dependent fast paths run here. Torch-free; choices.py applies it to the kernels and says what it chose.

    CPU (first match)                 oneDNN linear  Winograd  C attention  why
    AMX (amx_tile or amx_bf16)        off            off       off          not measured by us; a user with AVX-512
                                                                            and AMX reported neither gain of the first
                                                                            two; MKL runs AVX-512 on Intel, and AMX
                                                                            does not compute float32 anyway
    AMD, avx512f, <= 8 cores          on             on        on           measured faster on such a CPU: MKL
                                                                            takes its AVX2 code on AMD, oneDNN's GEMMs,
                                                                            the C Winograd kernel and the C attention
                                                                            their AVX-512; Winograd on wide maps only
                                                                            (winograd.py's thresholds);
                                                                            measured with 2 threads, assumed up to 8
    AMD, avx512f, > 8 cores           off            off       off          not measured
    Intel, avx512f without AMX        off            off       off          not measured; MKL has AVX-512 code on Intel
    avx2 without avx512f              off            off       off          not measured (and the C attention is
                                                                            AVX-512 code)
    anything else (no flags, ARM)     off            off       off          not measured

Where a rule sends convolutions to Winograd (NNPACK's threads or this package's), a shorter OpenMP idle spin, set in
the environment before Python starts, is faster (threads.py).

Linux: /proc/cpuinfo's `vendor_id` and `flags` of the first processor (the kernel's names: avx2, avx512f,
amx_tile, amx_bf16, ...) and the CPUs this process may run on. Elsewhere (or unreadable): no vendor and no
flags, which the last rule maps to the plain PyTorch paths. Nothing is timed: the same machine reads the same.
The measurements behind each rule are in docs/performance.md (Kernels by CPU).
"""
import os
from dataclasses import dataclass
from typing import Callable, FrozenSet

__all__ = ['CpuFeatures', 'read_cpu_features', 'parse_cpuinfo', 'CpuRule', 'CPU_RULES', 'MEASURED_MAX_CORES', 'rule_for']

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


MEASURED_MAX_CORES = 8   # the AMD rule's measurement used 2 threads; beyond this many cores it is not assumed


@dataclass(frozen=True)
class CpuRule:
    """One row of the table: which CPUs it matches, whether each CPU-dependent fast path runs there, and why."""
    cpus: str
    matches: Callable[[CpuFeatures], bool]
    onednn_linear: bool
    winograd: bool
    c_attention: bool
    why: str


def _amx(f: CpuFeatures) -> bool:
    return bool({'amx_tile', 'amx_bf16'} & f.flags)


CPU_RULES = (
    CpuRule('AMX', _amx, False, False, False,
            'not measured by us; a user with AVX-512 and AMX reported neither gain, and AMX does not compute float32'),
    CpuRule(f'AMD with avx512f, <= {MEASURED_MAX_CORES} cores',
            lambda f: f.vendor == 'AuthenticAMD' and 'avx512f' in f.flags and f.cores <= MEASURED_MAX_CORES, True, True, True,
            'measured faster on such a CPU with 2 threads: MKL takes its AVX2 code on AMD, oneDNN\'s GEMMs, the Winograd convs of wide maps '
            'and the C attention kernel use AVX-512'),
    CpuRule(f'AMD with avx512f, > {MEASURED_MAX_CORES} cores',
            lambda f: f.vendor == 'AuthenticAMD' and 'avx512f' in f.flags, False, False, False,
            'not measured at this core count'),
    CpuRule('Intel with avx512f, no AMX', lambda f: f.vendor == 'GenuineIntel' and 'avx512f' in f.flags, False, False, False,
            'not measured; MKL has AVX-512 code on Intel'),
    CpuRule('avx2 without avx512f', lambda f: 'avx2' in f.flags and 'avx512f' not in f.flags, False, False, False, 'not measured'),
    CpuRule('other CPUs', lambda f: True, False, False, False, 'not measured'),
)


def rule_for(features: CpuFeatures) -> CpuRule:
    """The first rule of CPU_RULES that matches these features (the last one matches every CPU)."""
    return next(rule for rule in CPU_RULES if rule.matches(features))
