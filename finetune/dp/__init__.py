"""The DP engine: per-example gradients and clipping (``per_example``), the drop-in optimizer that
adds certified noise (``optimizer``), Poisson sampling into fixed-shape micro-batches
(``sampling``), the privacy guard with its ledger and hard stop (``guard``) and data-parallel
training under ``msrun`` (``distributed``).

It depends on ``accountant`` (certified tables, ledgers, randomness) and on MindSpore, never on
``finetune.models`` or the training loop: any MindSpore network that returns per-example losses
can use it.  It imports nothing else from ``finetune`` (docs/architecture.md).
"""
