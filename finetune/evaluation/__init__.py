"""Leakage and utility evaluation for DP fine-tuning.

Pure metric modules (no MindSpore import): ``membership`` (membership-inference ROC, AUC, TPR at low
FPR, the DP hypothesis-testing bound), ``pii`` (PII extraction precision/recall, Lukas et al. 2023),
``canary`` (secret-sharer exposure, Carlini et al. 2019), ``audit`` (one-run audit, Steinke, Nasr and
Jagielski 2023, and a mechanism-level audit of a noise sampler), ``stats`` (exact binomial
intervals) and ``plots``. The command ``python -m finetune.evaluate`` glues them to a training run.
A front end: nothing below it (``finetune.dp``, the engine) imports it (docs/architecture.md).
"""
