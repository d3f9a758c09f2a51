"""How long OpenMP's idle threads spin, chosen by the CPU's rule and set by this project's scripts before PyTorch loads.

After every parallel region, libgomp's worker threads busy-wait for the next one: GOMP_SPINCOUNT iterations of a
pause instruction, 300,000 by default. That costs nothing while only OpenMP runs, but NNPACK's Winograd
convolutions (models/kernels/winograd.py) run on PyTorch's other thread pool, straight after the group norm and
SiLU's OpenMP region, and the spinning worker holds a core NNPACK's threads need, which slows the conv that follows.
So where the CPU's rule sends convolutions to NNPACK (utils/cpu_rules.py), the scripts shorten the spin to
SHORT_SPIN_COUNT: long enough to keep the transformer's back-to-back regions on busy-waiting workers, short enough
to hand the cores to NNPACK (`OMP_WAIT_POLICY=PASSIVE`, no spin at all, loses the first and slows the step from
tokens). The measurements are in docs/performance.md (OpenMP's idle spin).

libgomp reads the variable once, when PyTorch loads it, so it cannot be changed around the tokenizer: a script calls
`shorten_openmp_spin_for_nnpack()` before its first `import torch`. A value in the environment (GOMP_SPINCOUNT or
OMP_WAIT_POLICY) is the user's choice and is kept. Torch-free; importing it changes nothing.
"""
import os
import sys
from typing import Dict, Mapping, Optional

from utils.cpu_rules import CpuFeatures, read_cpu_features, rule_for

__all__ = ['SPIN_VAR', 'SHORT_SPIN_COUNT', 'openmp_spin_env', 'shorten_openmp_spin_for_nnpack', 'describe_openmp_spin']

SPIN_VAR = 'GOMP_SPINCOUNT'
SHORT_SPIN_COUNT = 10_000   # of the counts tried (1,000, 3,000, 10,000: docs/performance.md), the one that sampled fastest
_USER_VARS = (SPIN_VAR, 'OMP_WAIT_POLICY')


def openmp_spin_env(features: Optional[CpuFeatures] = None, environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The variables to add to `environ` for a CPU with these features (default: this one): the short spin where its
    rule runs NNPACK's Winograd and the user set neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY, else nothing."""
    if any(var in environ for var in _USER_VARS):
        return {}
    rule = rule_for(features if features is not None else read_cpu_features())
    return {SPIN_VAR: str(SHORT_SPIN_COUNT)} if rule.winograd else {}


def shorten_openmp_spin_for_nnpack() -> Dict[str, str]:
    """Put openmp_spin_env() into os.environ, before PyTorch is loaded (afterwards libgomp has read its settings and
    nothing is set). Returns what was set."""
    if 'torch' in sys.modules:
        return {}
    env = openmp_spin_env()
    os.environ.update(env)
    return env


def describe_openmp_spin() -> str:
    """One line: the OpenMP idle-wait settings this process has in its environment, and where they come from."""
    set_here = {var: os.environ[var] for var in _USER_VARS if var in os.environ}
    if not set_here:
        return 'OpenMP idle spin: libgomp\'s default (GOMP_SPINCOUNT and OMP_WAIT_POLICY unset)'
    settings = ', '.join(f'{k}={v}' for k, v in set_here.items())
    return (f'OpenMP idle spin: {settings} (this project\'s scripts set {SPIN_VAR}={SHORT_SPIN_COUNT} before PyTorch loads where '
            'the CPU rule runs NNPACK, unless the environment already says; utils/threads.py)')
