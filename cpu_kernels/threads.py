"""OpenMP's idle spin: what this CPU's rule would have it be, and what this process runs with.

After every parallel region, libgomp's worker threads busy-wait for the next one: GOMP_SPINCOUNT iterations of a
pause instruction, 300,000 by default. That costs nothing while only OpenMP runs, but the Winograd convolutions
(winograd.py: NNPACK's threads, or this package's C kernel on its own threads) run straight after the group norm and
SiLU's OpenMP region, and the spinning worker holds a core they need, which slows the conv that follows. Where the
CPU's rule sends convolutions to Winograd (cpu_rules.py) a shorter spin, SHORT_SPIN_COUNT, is faster: long enough to
keep the transformer's back-to-back regions on busy-waiting workers, short enough to hand the cores to the conv.

libgomp reads the variable once, when PyTorch loads it; a package imported after PyTorch cannot change it, and this
one sets nothing in the environment. The user sets it before Python starts (`GOMP_SPINCOUNT=10000 python sample.py
...`); describe_openmp_spin() says, among the kernel choices, what this process runs with and what the rule advises.
What the default spin costs is measured in docs/performance.md (OpenMP's idle spin). Torch-free.
"""
import os
from typing import Dict, Mapping, Optional

from .cpu_rules import CpuFeatures, read_cpu_features, rule_for

__all__ = ['SPIN_VAR', 'SHORT_SPIN_COUNT', 'openmp_spin_env', 'describe_openmp_spin']

SPIN_VAR = 'GOMP_SPINCOUNT'
SHORT_SPIN_COUNT = 10_000   # of the counts tried (1,000, 3,000, 10,000: docs/performance.md), the one that sampled fastest
_USER_VARS = (SPIN_VAR, 'OMP_WAIT_POLICY')


def openmp_spin_env(features: Optional[CpuFeatures] = None, environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The variables the rule advises adding to `environ` for a CPU with these features (default: this one): the
    short spin where its rule runs Winograd and the user set neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY, else nothing."""
    if any(var in environ for var in _USER_VARS):
        return {}
    rule = rule_for(features if features is not None else read_cpu_features())
    return {SPIN_VAR: str(SHORT_SPIN_COUNT)} if rule.winograd else {}


def describe_openmp_spin() -> str:
    """One line: the OpenMP idle-wait settings this process has in its environment, or the rule's advice where unset."""
    set_here = {var: os.environ[var] for var in _USER_VARS if var in os.environ}
    if set_here:
        return 'OpenMP idle spin: ' + ', '.join(f'{k}={v}' for k, v in set_here.items()) + ' (from the environment)'
    advice = openmp_spin_env(environ={})
    if not advice:
        return 'OpenMP idle spin: libgomp\'s default (GOMP_SPINCOUNT and OMP_WAIT_POLICY unset)'
    return (f'OpenMP idle spin: libgomp\'s default; on this CPU {SPIN_VAR}={advice[SPIN_VAR]} in the environment before Python '
            'starts makes the Winograd convs faster (libgomp reads it when PyTorch loads: cpu_kernels/threads.py)')
