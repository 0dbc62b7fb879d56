"""DP fine-tuning in MindSpore.

Layout (imports flow downwards only)::

    finetune.__main__, finetune.evaluate, finetune.data   command-line programs
    finetune.train                                        the CLI's loop over the engine
    finetune.engine                                       make_private: the one training engine
    finetune.evaluation                                   leakage and utility metrics
    finetune.dp                                           the DP engine (any MindSpore network)
    finetune.models                                       GPT-2, checkpoints, LoRA/BiTFiT, tokenizer
"""

__all__ = ["make_private"]


def __getattr__(name):
    """``from finetune import make_private`` without importing MindSpore for other submodules."""
    if name in ("make_private", "make_baseline", "PrivateEngine"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
