"""Federated DP fine-tuning on Flower: client-level DP-FedAvg with certified noise.

Several organisations fine-tune one GPT-2 adapter (LoRA or BiTFiT parameters; nothing else travels)
without pooling their data. The server runs DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018):

* every round each organisation joins independently with probability ``q`` (Poisson sampling,
  :mod:`finetune.federated.mechanism`), the condition of the amplification theorem the accountant
  applies (docs/soundness.md rule 7);
* each returned update (new adapter minus the global adapter) is clipped to norm ``C`` in the
  noise table's geometry, the clipped updates are summed, noise ``C * Z`` with ``Z`` drawn ONCE per
  round from the certified table (float64, the table's own sampler) is added to the sum, and the sum
  is divided by the expected number of organisations ``q * K``;
* one round is one Poisson-subsampled release: :mod:`finetune.federated.state` charges it to an
  ``accountant.ledger.PrivacyLedger``, refuses a round the certificate does not cover, and saves the
  ledger atomically after every round so that a restarted server resumes the same privacy record;
* sampling and noise (the server's and every organisation's) come from fresh OS entropy
  (``accountant.randomness.SecureRandom``, ChaCha20) unless a seed is given for an experiment,
  which warns (``KnownSeedWarning``): the certificate assumes noise nobody can regenerate.

Pieces: :mod:`.partition` (split a corpus across organisations by person), :mod:`.mechanism`
(sampling, clipping, the noisy sum: pure numpy), :mod:`.state` (ledger + global adapter on disk),
:mod:`.strategy` (the Flower strategy), :mod:`.client` (the Flower client: k local MindSpore steps,
optionally record-level DP-SGD), ``python -m finetune.federated`` (one command, real processes on
127.0.0.1). docs/federated.md states the guarantees and the neighbouring relation each covers; it
is a front end on top of ``finetune.dp`` and ``finetune.train`` (docs/architecture.md).
"""
