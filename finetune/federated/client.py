"""The Flower client of one organisation: its shard, k local MindSpore steps, the trained adapter.

Each round the client receives the global adapter (LoRA A/B or BiTFiT biases, in the sorted order
of ``finetune.models.peft.trainable_parameter_names``), writes it into its model, runs ``k`` local
steps and returns the trained tensors -- and nothing else: ``num_examples`` is the constant 1 and
the metrics are empty, because a shard size or a local loss sent to the server would be a release
that no certificate covers.  The server computes the update (returned minus sent) and clips it.

Local steps run on the library's one training engine: with a record-level table
(``record_table``) ``finetune.make_private(model, Adam, noise=record_table, ...)`` (Poisson sampling
at the table's rate, per-example clipping, noise from that table, the organisation's own
``ReleaseGuard`` ledger): a guarantee for one record of this organisation, whatever the server does
(docs/federated.md); without one ``finetune.engine.make_baseline`` (the same loop, no clipping or
noise).  Sampling and noise come from OS-keyed ChaCha20 (a new key in every process) unless a seed
is given for an experiment (then ``KnownSeedWarning``).  The client answers Flower's
``get_properties`` with its organisation index (the operator's numbering, no data), so the server
can say which organisation failed in which round.  When the record-level budget is spent the client
returns the adapter it received unchanged (a zero update).  The ledger is saved after every round
to ``record_ledger_path`` and read back from there when the process starts again (a resumed
federation), so the record-level account continues and never restarts.

Run as a process by ``python -m finetune.federated`` (``python -m finetune.federated.client``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["OrganisationClient", "load_shard", "build_model", "base_sha256"]


def build_model(model_name: str, method: str, seed: int, lora_r: int = 8, lora_alpha: float = 16.0,
                lora_targets=("c_attn",)):
    """The base model with LoRA or BiTFiT applied (identical on the server and every client)."""
    from finetune.models import checkpoint, peft

    model = checkpoint.from_pretrained(model_name, seed=seed)
    if method == "lora":
        peft.apply_lora(model, r=lora_r, alpha=lora_alpha, targets=tuple(lora_targets), seed=seed)
    elif method == "bitfit":
        peft.apply_bitfit(model)
    else:
        raise ValueError(f"method must be lora or bitfit (only the adapter travels), got {method!r}")
    return model


def base_sha256(model) -> str:
    """SHA-256 of the frozen base weights: server and clients must start from the same model."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.parameters_and_names(), key=lambda t: t[0]):
        if not p.requires_grad:
            h.update(name.encode() + p.asnumpy().tobytes())
    return h.hexdigest()


def load_shard(data_path: str, tokenizer, *, index: int, clients: int, seq_len: int,
               val_fraction, seed: int):
    """(ids, mask) of organisation ``index``: the training split divided by person."""
    from finetune.data import encode_texts, load_records, split_records

    from .partition import split_by_person

    train, _ = split_records(load_records(data_path), val_fraction, seed)
    rows = split_by_person(train, clients, seed)[index]
    ids, mask, _ = encode_texts(tokenizer, [train[i]["text"] for i in rows], seq_len)
    return ids, mask


class OrganisationClient:
    """A ``flwr.client.NumPyClient`` (built by :meth:`numpy_client`) around one shard."""

    def __init__(self, model, train_ids, train_mask, *, local_steps: int, lr: float = 1e-3,
                 local_batch: int = 16, micro_batch: int = 16, record_table=None,
                 record_clip: float = 1.0, record_ledger_path: str | None = None,
                 seed: int | None = None, secure: bool = False, index: int | None = None):
        from mindspore import nn

        from finetune.engine import make_baseline, make_private, refuse_pipeline

        refuse_pipeline(train_ids, train_mask)

        self.model = model
        self.ids, self.mask = train_ids, train_mask
        self.local_steps, self.micro_batch = int(local_steps), int(micro_batch)
        self.names = sorted(n for n, p in model.parameters_and_names() if p.requires_grad)
        self.params = dict((n, p) for n, p in model.parameters_and_names() if p.requires_grad)
        self.base = base_sha256(model)
        if secure and seed is not None:
            raise ValueError("a secure generator cannot be seeded; drop the seed or secure=True")
        n = len(train_ids)
        opt = nn.Adam([self.params[k] for k in self.names], learning_rate=lr)
        rand = dict(seed=seed, secure=None if seed is None else False,
                    micro_batch_size=self.micro_batch)
        self.engine = self.guard = self.sampler = None
        if n and record_table is not None:
            from finetune.dp.guard import certified_epsilon
            self.engine = make_private(model, opt, dataset_size=n, noise=record_table,
                                       max_grad_norm=record_clip,
                                       epsilon_budget=certified_epsilon(record_table), **rand)
            self.guard = self.engine.guard
            if record_ledger_path and os.path.exists(record_ledger_path):
                self._load_ledger(record_ledger_path)
        elif n:   # no record-level table: the same engine without clipping or noise
            self.engine = make_baseline(model, opt, dataset_size=n, steps=10 ** 12,
                                        sampling_rate=min(1.0, local_batch / n), **rand)
        if self.engine is not None:
            self.sampler = self.engine.sampler
            self.dp = self.engine.optimizer
        self._batches = None
        self.record_ledger_path = record_ledger_path
        self.rounds = 0
        self.index = index

    def _load_ledger(self, path: str) -> None:
        """Continue the record-level account of an earlier process of this organisation."""
        from accountant.ledger import PrivacyLedger

        with open(path) as f:
            text = f.read()
        try:
            steps = PrivacyLedger.from_json(text).steps
            self.guard.load_state_dict({"steps_taken": steps, "ledger": text})
        except ValueError as exc:
            raise ValueError(f"{path}: the saved record-level ledger belongs to another table or run "
                             f"({exc})") from None

    def get_parameters(self) -> list:
        return [self.params[n].asnumpy().copy() for n in self.names]

    def set_parameters(self, arrays) -> None:
        from finetune.models.gpt2 import assign_parameter

        if len(arrays) != len(self.names):
            raise ValueError(f"received {len(arrays)} tensors, the adapter has {len(self.names)}")
        for name, a in zip(self.names, arrays):
            assign_parameter(self.params[name], a)

    def fit(self, arrays, config) -> tuple[list, int, dict]:
        """Load the global adapter, take k local steps, return the trained adapter (only)."""
        expected = config.get("base_sha256")
        if expected and expected != self.base:
            raise RuntimeError("this organisation's base model differs from the server's")
        self.set_parameters(arrays)
        if self.engine is not None:
            if self._batches is None:   # one pass over the engine's planned steps, across rounds
                self._batches = self.engine.batches(self.ids, self.mask)
            for _ in range(self.local_steps):
                if self.engine.guard.remaining() == 0:
                    self.set_parameters(arrays)       # record budget spent: a zero update
                    break
                self.engine.step(next(self._batches))
        self.rounds += 1
        if self.guard is not None and self.record_ledger_path:
            from .state import atomic_write
            atomic_write(self.record_ledger_path, self.guard.ledger.to_json().encode())
        return self.get_parameters(), 1, {}

    def numpy_client(self):
        import flwr as fl

        outer = self

        class _Client(fl.client.NumPyClient):
            def get_parameters(self, config):
                return outer.get_parameters()

            def get_properties(self, config):
                return {} if outer.index is None else {"organisation": int(outer.index)}

            def fit(self, parameters, config):
                return outer.fit(parameters, config)

        return _Client()


def check_loopback(address: str) -> str:
    """Accept only ``127.x.x.x:port`` / ``[::1]:port`` / ``localhost:port``."""
    import ipaddress

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            raise ValueError(f"server address {address!r} is not a loopback address; this command "
                             "runs a federation on one machine only") from None
    if not port.isdigit():
        raise ValueError(f"server address {address!r} has no port")
    return address


def _exit_with_parent() -> None:
    """End this process when the server process that started it is gone (killed or crashed), so
    no organisation keeps retrying a server that will not come back."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.federated.client",
                                description="One organisation of a local federation (started by "
                                            "python -m finetune.federated).")
    p.add_argument("--server", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--config", required=True, help="JSON file written by python -m finetune.federated")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    check_loopback(args.server)
    import flwr as fl
    import mindspore as ms

    from accountant.table import load_table
    from finetune.models.tokenizer import load_tokenizer

    ms.set_context(mode=ms.GRAPH_MODE)
    # model init and the partition use the public seed; sampling and noise the secret source
    model = build_model(cfg["model"], cfg["method"], cfg["init_seed"], cfg["lora_r"], cfg["lora_alpha"],
                        cfg["lora_targets"])
    tok = load_tokenizer(model.config.vocab_size)
    ids, mask = load_shard(cfg["data"], tok, index=args.index, clients=cfg["clients"],
                           seq_len=cfg["seq_len"], val_fraction=cfg["val_fraction"],
                           seed=cfg["init_seed"])
    record_table = load_table(cfg["record_table"]) if cfg.get("record_table") else None
    ledger_path = None
    if record_table is not None:
        ledger_path = os.path.join(cfg["workdir"], "clients", f"client-{args.index}.ledger.json")
    client = OrganisationClient(model, ids, mask, local_steps=cfg["local_steps"], lr=cfg["lr"],
                                local_batch=cfg["local_batch"], micro_batch=cfg["micro_batch"],
                                record_table=record_table, record_clip=cfg["record_clip"],
                                record_ledger_path=ledger_path, index=args.index,
                                seed=None if cfg["seed"] is None else cfg["seed"] * 1000 + 1 + args.index)
    # (no shard size in the log: the log lands in the run folder, and a shard size is not released)
    print(f"organisation {args.index}: connecting to {args.server}", file=sys.stderr, flush=True)
    _exit_with_parent()
    fl.client.start_client(server_address=args.server, client=client.numpy_client().to_client(),
                           insecure=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
