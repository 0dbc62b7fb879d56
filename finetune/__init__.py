"""DP fine-tuning in MindSpore.

Layout (imports flow downwards only; docs/architecture.md, checked by tests/test_architecture.py)::

    finetune.__main__, evaluate, export, federated,     command-line programs and front ends
    evaluation, data
    finetune.engine, finetune.train                     the training engine: make_private, train()
    finetune.dp                                         per-example clipping, noise, sampling, guard
    finetune.models; cli, run_dir, checkpointing        models (no privacy); the I/O and CLI kit
    accountant                                          certificates, ledgers, tables, randomness
"""

__all__ = ["make_private"]


def __getattr__(name):
    """``from finetune import make_private`` without importing MindSpore for other submodules."""
    if name in ("make_private", "make_baseline", "PrivateEngine"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
