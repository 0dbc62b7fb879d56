"""DP-FedAvg as a Flower strategy: Poisson client sampling, clipping, one certified noise draw.

``DPFedAvg`` subclasses ``flwr.server.strategy.FedAvg`` and replaces the three steps that decide
privacy (:mod:`finetune.federated.mechanism` has the formulas):

* ``configure_fit`` samples every connected organisation independently with probability ``q``
  (Flower's own ``ClientManager.sample`` draws a fixed number, which the amplification theorem
  does not cover); an empty sample is still a release (noise only) and is charged;
* ``aggregate_fit`` clips each update (returned adapter minus the adapter that was sent) in the
  table's norm, sums, adds ``C * Z`` once and divides by ``q * K`` (unweighted: client-reported
  example counts are never used, they would leak shard sizes);
* failures and time-outs are ignored (``accept_failures``): the round is released with the updates
  that arrived, with the same noise and the same divisor (docs/federated.md explains why that is
  sound); the round's record names the organisations that were not connected (``absent``) and
  those sampled whose update did not arrive or was malformed (``failed``), by the index each
  organisation reports once through Flower's ``get_properties``.

Sampling and noise come from fresh OS-keyed ChaCha20 generators unless a seed is given (then
``KnownSeedWarning``: anyone who knows it can replay the noise).

The global adapter is held here in float64 (``FederationState``), not in Flower's ``Server``, so a
noise-only round (no client sampled) updates it too; the state is charged and saved every round.
"""
from __future__ import annotations

import time

import numpy as np
from flwr.common import FitIns, GetPropertiesIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from .mechanism import clip_update, noisy_mean, poisson_select
from .state import FederationState, round_rng

__all__ = ["DPFedAvg"]


class DPFedAvg(FedAvg):
    """Client-level DP-FedAvg (McMahan et al., ICLR 2018) with noise from a certified table.

    Parameters: ``state`` (ledger + global adapter, :class:`FederationState`), ``table`` (the
    certified noise table), ``n_clients`` K (the population; the divisor is ``q * K``),
    ``clip_norm`` C, ``max_releases`` (the table's T), ``seed`` (sampling and noise; default None:
    fresh OS entropy every round, ``accountant.randomness.SecureRandom``; a seed warns
    ``KnownSeedWarning``), ``secure`` (kept for compatibility: refuses a seed),
    ``server_lr`` (the global step on the noisy mean), ``wait_timeout`` (seconds to wait for all
    organisations to connect before the first round), ``base_sha256`` (sent to clients so that a
    client with a different frozen base model refuses to train).
    """

    def __init__(self, state: FederationState, table, *, n_clients: int, clip_norm: float,
                 max_releases: int, seed: int | None = None, secure: bool = False,
                 server_lr: float = 1.0, wait_timeout: float = 600.0, base_sha256: str = "",
                 add_noise: bool = True, on_round=None, stop=None):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1,
                         min_evaluate_clients=0, min_available_clients=int(n_clients),
                         accept_failures=True)
        self.state, self.table = state, table
        self.n_clients, self.clip_norm = int(n_clients), float(clip_norm)
        self.q = float(state.mechanism.sampling_rate)
        self.max_releases = int(max_releases)
        if secure and seed is not None:
            raise ValueError("a secure generator cannot be seeded; drop the seed or secure=True")
        if seed is not None:
            from accountant.randomness import warn_known_seed
            warn_known_seed(seed)
        self.seed, self.secure, self.server_lr = seed, seed is None, float(server_lr)
        self.wait_timeout, self.base_sha256 = float(wait_timeout), str(base_sha256)
        self.add_noise = bool(add_noise)
        self.on_round = on_round
        self.stop = stop                # an Event (finetune.cli.Stopper): set, no further round begins
        self.stopped_by_signal = False
        self.names = sorted(state.global_params)
        self.shapes = [tuple(state.global_params[n].shape) for n in self.names]
        self.stopped_by_budget = False
        self.messages = []            # per received FitRes: what the client sent (for inspection)
        self.organisation_of = {}     # Flower node id -> organisation index (None: not reported)
        self._pending = None
        self._waited = False

    def __repr__(self) -> str:
        return f"DPFedAvg(q={self.q}, K={self.n_clients}, C={self.clip_norm})"

    # --- parameters -------------------------------------------------------------------------
    def _global_arrays(self) -> list:
        return [self.state.global_params[n].astype(np.float32) for n in self.names]

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters(self._global_arrays())

    # --- one round ----------------------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):
        if self.stop is not None:
            if self.stop.is_set():              # interrupted: nothing sampled, nothing charged
                self.stopped_by_signal = True
                return []
            rearm = getattr(self.stop, "rearm", None)
            if rearm is not None:               # Flower's start_server installs its own handlers
                rearm()
        if not self.state.can_release(self.max_releases):
            self.stopped_by_budget = True
            return []
        if not self._waited:                      # first round of this server process
            client_manager.wait_for(self.n_clients, timeout=int(self.wait_timeout))
            self._waited = True
        population = sorted(client_manager.all().items())        # by Flower node id
        connected = [self._organisation(proxy) for _, proxy in population]
        release = self.state.releases
        picked = poisson_select(len(population), self.q,
                                round_rng(self.seed, release, 0, self.secure)) if population else []
        sent = self._global_arrays()
        fit_ins = FitIns(ndarrays_to_parameters(sent), {"base_sha256": self.base_sha256})
        down = sum(len(t) for t in fit_ins.parameters.tensors)
        self._pending = {"start": time.perf_counter(), "sent": sent, "sampled": int(len(picked)),
                         "connected": len(population), "bytes_down": down * int(len(picked)),
                         "picked": {population[i][0]: connected[i] for i in picked},
                         "absent": (sorted(set(range(self.n_clients)) - set(connected))
                                    if None not in connected else None)}
        if len(picked) == 0:                      # a noise-only release: still certified, charged
            self._release(np.zeros(sum(int(np.prod(s)) for s in self.shapes)), 0, 0, 0, 0, [])
            return []
        return [(population[i][1], fit_ins) for i in picked]

    def _organisation(self, proxy):
        """The index organisation ``proxy`` reports (asked once per connection; None if it does
        not say).  The index is the operator's own numbering, not data."""
        if proxy.cid not in self.organisation_of:
            try:
                props = proxy.get_properties(GetPropertiesIns({}), timeout=60.0, group_id=None).properties
                index = props.get("organisation")
            except Exception:                     # a client that cannot answer: unidentified
                index = None
            valid = isinstance(index, int) and 0 <= index < self.n_clients
            self.organisation_of[proxy.cid] = index if valid else None
        return self.organisation_of[proxy.cid]

    def aggregate_fit(self, server_round, results, failures):
        pending = self._pending
        sent = np.concatenate([a.astype(np.float64).reshape(-1) for a in pending["sent"]])
        total = np.zeros_like(sent)
        received, clipped, bytes_up, malformed = 0, 0, 0, 0
        arrived = set()
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            self.messages.append({"shapes": [tuple(a.shape) for a in arrays],
                                  "dtypes": [str(a.dtype) for a in arrays],
                                  "num_examples": res.num_examples, "metrics": dict(res.metrics)})
            bytes_up += sum(len(t) for t in res.parameters.tensors)
            if [tuple(a.shape) for a in arrays] != self.shapes:
                malformed += 1                    # treated like a client that sent nothing
                continue
            new = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])
            update, size = clip_update(new - sent, self.clip_norm, self.table.geometry)
            total += update
            received += 1
            arrived.add(proxy.cid)
            clipped += int(not size <= self.clip_norm)
        failed_orgs = [org for cid, org in pending["picked"].items() if cid not in arrived]
        self._release(total, received, len(failures) + malformed, clipped, bytes_up, failed_orgs)
        return ndarrays_to_parameters(self._global_arrays()), {}

    def _release(self, total, received, failed, clipped, bytes_up, failed_orgs) -> None:
        pending = self._pending
        rng = round_rng(self.seed, self.state.releases, 1, self.secure)
        mean = noisy_mean(total, self.table.noise, self.clip_norm, self.q * self.n_clients, rng,
                          add_noise=self.add_noise)
        new_global, k = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            new_global[name] = self.state.global_params[name] + self.server_lr * mean[k:k + size].reshape(shape)
            k += size
        record = {"connected": pending["connected"], "sampled": pending["sampled"],
                  "received": int(received), "failed": int(failed), "clipped": int(clipped),
                  "bytes_down": int(pending["bytes_down"]), "bytes_up": int(bytes_up),
                  "seconds": time.perf_counter() - pending["start"],
                  # organisations by index: not connected when the round sampled (None: unknown,
                  # a client did not report its index), and sampled but no (well-formed) update
                  "absent": pending["absent"],
                  "failed_organisations": sorted(failed_orgs, key=lambda o: (o is None, o or 0))}
        self.state.charge_and_save(new_global, record)
        self.state.history[-1]["epsilon"] = self.state.epsilon()
        self.state.save()
        self._pending = None
        if self.on_round is not None:
            self.on_round(self.state.history[-1])

    # --- no federated evaluation (it would be another release) ---------------------------------
    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
