"""How sure a sampled dirty rate is: pooled page samples and their upper confidence bound. Pure.

QEMU's page sampling (``virDomainStartDirtyRateCalc``, the only safe probe here; see
:mod:`~asyncmigfra.hypervisor.virt.dirtyrate`) hashes ``n`` pages picked at random, with
replacement, from the guest's RAM, waits the sample period and counts the ``k`` of them whose
hash changed. Its figure is ``k / n`` of the guest's memory per period. With QEMU's default of
512 pages per GiB (libvirt neither sets nor reports another), every page found dirty stands
for 2 MiB: a 128 MiB guest is judged from 64 pages, and a guest that really rewrites 16 MiB
per second reads anywhere from 8 to 24 MiB/s.

So ``k`` is binomial: ``k ~ B(n, p)`` with ``p`` the share of the guest's pages dirtied in
one period. Several probes of the same period pool their pages (``k`` and ``n`` add up).
:func:`upper_share` is the exact one-sided Clopper-Pearson bound: the largest ``p`` for which
seeing at most ``k`` dirty pages still has a chance of ``1 - confidence``. Where both ``k``
and ``n - k`` are large it uses the Wilson score bound with continuity correction instead
(the exact sum would cost too much on the event loop, and the two agree there).

The prediction judges *whether* a migration converges at :attr:`DirtyPageSample.upper`
(:data:`CONFIDENCE`) and predicts *how long* it takes at :attr:`DirtyPageSample.rate`, the
point estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist
from typing import Final

from asyncmigfra.hypervisor.base import DirtyPageSample

__all__ = ["CONFIDENCE", "EXACT_TERMS", "pooled", "upper_rate", "upper_share"]

#: One-sided confidence of the bound the converges verdict uses.
CONFIDENCE: Final = 0.95
#: The exact bound sums at most this many binomial terms (else Wilson's bound).
EXACT_TERMS: Final = 300
_BISECTIONS: Final = 60


def pooled(samples: Iterable[DirtyPageSample]) -> DirtyPageSample | None:
    """The samples as one (pages and dirty pages added up; the largest memory and period
    stand for all: probes of one guest share both). ``None`` for no samples."""
    taken = list(samples)
    if not taken:
        return None
    return DirtyPageSample(
        sampled=sum(s.sampled for s in taken),
        dirty=sum(s.dirty for s in taken),
        memory=max(s.memory for s in taken),
        period=max(s.period for s in taken),
    )


def upper_rate(sample: DirtyPageSample, confidence: float = CONFIDENCE) -> float:
    """Bytes/s the guest dirties at most, with ``confidence``, given ``sample``."""
    return upper_share(sample.dirty, sample.sampled, confidence) * sample.memory / sample.period


def upper_share(dirty: int, sampled: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided upper confidence bound of a binomial share from ``dirty`` successes in
    ``sampled`` draws (see the module). 1 when ``sampled`` is 0 (nothing is known)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0 <= dirty <= sampled:
        raise ValueError(f"need 0 <= dirty <= sampled, got {dirty!r} of {sampled!r}")
    alpha = 1.0 - confidence
    if dirty == sampled:  # all dirty, or nothing sampled
        return 1.0
    if dirty == 0:
        return 1.0 - float(alpha ** (1.0 / sampled))
    if min(dirty + 1, sampled - dirty) > EXACT_TERMS:
        return _wilson_upper(dirty, sampled, confidence)
    low, high = dirty / sampled, 1.0  # P(X <= dirty) at low > alpha, at high = 0 < alpha
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if _cdf(dirty, sampled, middle) > alpha:
            low = middle
        else:
            high = middle
    return high


def _cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ B(n, p), summing the shorter tail (0 < k < n, 0 < p < 1)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)

    def term(i: int) -> float:
        log = base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        return math.exp(log)

    if k + 1 <= n - k:
        return min(1.0, math.fsum(term(i) for i in range(k + 1)))
    return max(0.0, 1.0 - math.fsum(term(i) for i in range(k + 1, n + 1)))


def _wilson_upper(k: int, n: int, confidence: float) -> float:
    """Wilson's score bound with continuity correction (Newcombe 1998, method 4)."""
    z = NormalDist().inv_cdf(confidence)
    p = k / n
    root = z * math.sqrt(z * z + 2 - 1 / n + 4 * p * (n * (1 - p) - 1))
    return min(1.0, (2 * n * p + z * z + 1 + root) / (2 * (n + z * z)))
