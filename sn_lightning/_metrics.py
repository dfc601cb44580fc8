"""How per-batch means are weighted in ``self.log(..., sync_dist=True)`` epoch means.

Note [uneven ranks]
    Under DDP the validation and test shares are unpadded (``ImageDataModule._loader``), so the
    ranks may hold different numbers of examples. Lightning's epoch mean of a logged value is
    ``sum_r value_r / sum_r n_r``, each synchronised with a mean over ranks; the count ``n_r`` is
    an integer tensor when ``batch_size`` is an int, and its mean over ranks is truncated
    (Lightning 2.6, ``_sync_ddp``: 143 examples on 2 ranks averaged to 71, not 71.5, which put
    ``val/loss`` and ``val/certified_acc`` 143/142 too high). A float ``batch_size`` keeps the
    count a float tensor; the weights themselves are unchanged.
"""

from __future__ import annotations


def batch_weight(n: int) -> float:
    """``batch_size`` for ``self.log``: the example count as a float (Note [uneven ranks])."""
    return float(n)
