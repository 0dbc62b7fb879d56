"""Privacy accounting: noise laws, mechanisms and their certificates (two routes), ledgers, certified
tables and the seeded or secure random sources.  The bottom layer: it imports neither ``noise_search``
nor ``finetune`` (docs/architecture.md).  Command line: ``python -m accountant --help``.
"""
