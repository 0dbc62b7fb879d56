"""Federated DP fine-tuning (finetune.federated): DP-FedAvg on Flower with certified noise.

Quick tests drive the real strategy through Flower's gRPC transport with light numpy clients in
separate processes (one of them killed mid-round), check the noise of one round's aggregate against
the table, the Poisson client sampling, the ledger against the accountant, a resumed server, and
what a real MindSpore client puts into its Flower reply. The end-to-end CLI run is marked slow.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import flwr

from flwr.common import (Code, FitIns, FitRes, GetPropertiesRes, Status,  # noqa: E402
                          ndarrays_to_parameters, parameters_to_ndarrays)

from accountant.certify import certify  # noqa: E402
from accountant.ledger import PrivacyLedger  # noqa: E402
from accountant.mechanism import Mechanism  # noqa: E402
from accountant.noise import Gaussian  # noqa: E402
from accountant.randomness import KnownSeedWarning, SecureRandom  # noqa: E402
from accountant.table import load_table, save_table  # noqa: E402
from helpers import certified_table  # noqa: E402
from finetune.data import generate_records, write_jsonl  # noqa: E402
from finetune.federated.mechanism import clip_update, poisson_select  # noqa: E402
from finetune.federated.partition import split_by_person  # noqa: E402
from finetune.federated.state import FederationState, StateError, round_rng  # noqa: E402
from finetune.federated.strategy import DPFedAvg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
# most tests seed on purpose, to compare a release with its exact draw; the warning is tested below
pytestmark = pytest.mark.filterwarnings("ignore::accountant.randomness.KnownSeedWarning")


def _table(path, sigma, q, steps, geometry="l2"):
    return certified_table(path, Gaussian(sigma), geometry, q, steps, DELTA)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("fedtables")
    return {"q1": _table(d / "q1.npz", 2.0, 1.0, 6), "q1_path": d / "q1.npz",
            "q05": _table(d / "q05.npz", 1.5, 0.5, 4), "q05_path": d / "q05.npz"}


# ------------------------------------------------------------------------- fakes for the strategy
class _Proxy:
    """A connected organisation as the server sees it; it reports its index like the real client."""

    def __init__(self, cid, index=None):
        self.cid, self.index = cid, index

    def get_properties(self, ins, timeout, group_id):
        props = {} if self.index is None else {"organisation": self.index}
        return GetPropertiesRes(Status(Code.OK, ""), props)


class _Manager:
    """A Flower ClientManager stand-in holding ``n`` connected clients."""

    def __init__(self, n):
        self.clients = {f"node-{i:03d}": _Proxy(f"node-{i:03d}", i) for i in range(n)}

    def wait_for(self, n, timeout):
        return True

    def all(self):
        return dict(self.clients)


def _fit_res(arrays, num_examples=1, metrics=None):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, metrics or {})


def _strategy(tmp_path, table, shapes, *, n_clients, seed=0, clip=1.0, config=None, name="state"):
    init = {f"p{i}": np.zeros(s) for i, s in enumerate(shapes)}
    d = tmp_path / name
    d.mkdir()
    state = FederationState.create(d, table, init, config or {"k": 1}, table.sampling_rate)
    return DPFedAvg(state, table, n_clients=n_clients, clip_norm=clip, max_releases=table.steps,
                    seed=seed), state


def _round(strategy, manager, updates=None, fail=()):
    """One round: configure, every sampled client returns sent + its update (default zero);
    the sampled clients whose index is in ``fail`` send nothing (a Flower failure)."""
    ins = strategy.configure_fit(1, None, manager)
    results, failures = [], []
    for j, (proxy, fit_ins) in enumerate(ins):
        if proxy.index in fail:
            failures.append(TimeoutError("no update"))
            continue
        sent = parameters_to_ndarrays(fit_ins.parameters)
        upd = updates[j] if updates is not None else [np.zeros_like(a) for a in sent]
        results.append((proxy, _fit_res([a + u for a, u in zip(sent, upd)])))
    if ins:
        strategy.aggregate_fit(1, results, failures)
    return ins


# ------------------------------------------------------------------------------------ quick tests
def test_split_by_person_puts_each_person_in_one_organisation():
    for people in (150, 40):          # sparse and dense (one giant component) populations
        records = generate_records(300, seed=3, people=people)
        shards = split_by_person(records, 3, seed=0)
        assert sorted(np.concatenate(shards).tolist()) == list(range(len(records)))
        owner = {}
        for org, rows in enumerate(shards):   # persons by id: two persons may share a Faker name
            for i in rows:
                for x in records[i]["people"]:
                    assert owner.setdefault(x, org) == org, f"person {x} in two organisations"
        if people == 150:
            assert min(len(s) for s in shards) > 0.25 * len(records)


def test_noise_is_added_once_per_round_at_the_table_scale(tmp_path, tables):
    """One round's aggregate with zero updates is C * Z / (q K): its variance is the table's
    (C sigma / (q K))^2, not K times smaller (noise per client, then averaged)."""
    table, k, clip, d = tables["q1"], 3, 0.7, 200_000
    strategy, state = _strategy(tmp_path, table, [(d // 2,), (d // 4, 2)], n_clients=k, clip=clip)
    ins = _round(strategy, _Manager(k))
    assert len(ins) == k                       # q = 1: every organisation
    released = np.concatenate([state.global_params[n].reshape(-1) for n in strategy.names])
    expected_sd = clip * 2.0 / (1.0 * k)
    ratio = released.var() / expected_sd ** 2
    assert abs(ratio - 1) < 0.02, ratio         # sd of the estimate ~ sqrt(2 / d) = 0.3%
    # the law: C * Z / (qK) with Z ~ the table's noise, drawn from the certified sampler
    z = released * k / clip
    assert stats.kstest(z, table.noise.cdf).pvalue > 1e-3
    # and it is exactly the draw of the round's noise generator, in float64
    again = table.noise.sample(d, round_rng(0, 0, 1))
    order = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in
                            [np.zeros(d // 2), np.zeros((d // 4, 2))]])
    assert np.allclose(released, order + clip * again / k, rtol=0, atol=1e-12)
    assert state.releases == 1


def test_clipped_updates_are_summed_then_divided_by_the_expected_count(tmp_path, tables):
    table, k = tables["q1"], 3
    strategy, state = _strategy(tmp_path, table, [(4,)], n_clients=k, clip=1.0)
    strategy.add_noise = False                 # isolate the deterministic part of the release
    ups = [[np.array([3.0, 4.0, 0, 0])], [np.array([0.3, 0, 0, 0])], [np.array([0, 0, 0.1, 0])]]
    _round(strategy, _Manager(k), ups)
    expected = (np.array([0.6, 0.8, 0, 0]) + np.array([0.3, 0, 0, 0]) + np.array([0, 0, 0.1, 0])) / 3
    assert np.allclose(state.global_params["p0"], expected, atol=1e-7)
    assert state.history[-1]["clipped"] == 1
    v, n = clip_update(np.array([1.0, -1.0, 2.0]), 1.0, "l1")
    assert n == 4.0 and np.isclose(np.abs(v).sum(), 1.0)


def test_client_sampling_is_poisson(tmp_path, tables):
    """Inclusion frequency q per client, Binomial(K, q) sample sizes, independent pairs, and the
    strategy samples exactly that way (not Flower's fixed-count sampling)."""
    k, q, rounds = 8, 0.5, 4000
    picks = np.zeros((rounds, k), bool)
    for r in range(rounds):
        picks[r, poisson_select(k, q, round_rng(7, r, 0))] = True
    for i in range(k):
        assert stats.binomtest(int(picks[:, i].sum()), rounds, q).pvalue > 1e-4
    sizes = np.bincount(picks.sum(1), minlength=k + 1)
    expected = stats.binom.pmf(np.arange(k + 1), k, q) * rounds
    assert stats.chisquare(sizes, expected).pvalue > 1e-4
    both = (picks[:, 0] & picks[:, 1]).sum()
    assert stats.binomtest(int(both), rounds, q * q).pvalue > 1e-4
    # the strategy's choice is this sampler's, round by round, including empty rounds
    strategy, state = _strategy(tmp_path, tables["q05"], [(3,)], n_clients=k, seed=7)
    manager = _Manager(k)
    names = sorted(manager.clients)
    for r in range(4):
        ins = _round(strategy, manager)
        want = [names[i] for i in poisson_select(k, 0.5, round_rng(7, r, 0))]
        assert [p.cid for p, _ in ins] == want
    assert state.releases == 4                 # empty samples are releases too


def test_ledger_matches_the_accountant_and_stops_at_the_table(tmp_path, tables):
    table = tables["q05"]
    strategy, state = _strategy(tmp_path, table, [(5,)], n_clients=4)
    manager = _Manager(4)
    for r in range(table.steps):
        _round(strategy, manager)
    direct = certify(Mechanism(Gaussian(1.5), 1.0, "l2", 0.5, table.steps), DELTA).epsilon
    assert state.releases == table.steps
    assert math.isclose(state.epsilon(), direct, rel_tol=1e-9)
    assert math.isclose(state.epsilon(), table.certified_epsilon, rel_tol=1e-6)
    saved = PrivacyLedger.from_json((state.directory / "ledger.json").read_text())
    assert saved.steps == table.steps and math.isclose(saved.epsilon(), direct, rel_tol=1e-9)
    assert strategy.configure_fit(99, None, manager) == []   # no round beyond the certificate
    assert strategy.stopped_by_budget and state.releases == table.steps
    mid = [h["epsilon"] for h in state.history]
    assert all(a < b for a, b in zip(mid, mid[1:]))
    assert math.isclose(mid[2], certify(Mechanism(Gaussian(1.5), 1.0, "l2", 0.5, 3), DELTA).epsilon,
                        rel_tol=1e-9)


def _claimed_table(path, sigma, q, steps, claim):
    """A Gaussian table whose metadata claims ``claim`` as its certified epsilon (checksum valid)."""
    save_table(path, Gaussian(sigma), {"family": "gaussian", "params": {}, "eps_target": claim,
                                       "delta": DELTA, "sampling_rate": q, "steps": steps,
                                       "geometry": "l2", "certified_epsilon": {"final": claim},
                                       "gaussian_sigma": sigma, "gaussian_expected_abs": 0.8 * sigma})
    return load_table(path)


def test_budget_check_tolerates_rounding_but_not_an_understated_claim(tmp_path):
    """A table's stored certificate may sit 1e-13 below a re-certification of the same mechanism:
    all T rounds are still taken. A table claiming 10% less than the truth stops early, with the
    ledger's (recomputed) epsilon within the claim."""
    true_eps = certify(Mechanism(Gaussian(2.0), 1.0, "l2", 1.0, 3), DELTA).epsilon
    for claim, rounds in ((true_eps * (1 - 1e-13), 3), (true_eps * 0.9, 2)):
        table = _claimed_table(tmp_path / f"{claim}.npz", 2.0, 1.0, 3, claim)
        strategy, state = _strategy(tmp_path, table, [(3,)], n_clients=2, name=f"s{rounds}")
        for _ in range(3):
            _round(strategy, _Manager(2))
        assert state.releases == rounds and strategy.stopped_by_budget == (rounds < 3)
        assert state.epsilon() <= claim * (1 + 1e-9)


def test_restarted_server_resumes_the_same_ledger(tmp_path, tables):
    table, cfg = tables["q05"], {"clients": 4, "clip_norm": 1.0}
    strategy, state = _strategy(tmp_path, table, [(6,)], n_clients=4, config=cfg)
    for _ in range(3):
        _round(strategy, _Manager(4))
    before = (state.directory / "ledger.json").read_text()
    resumed = FederationState.load(state.directory, table, cfg, 0.5)
    assert resumed.ledger.to_json() == before and resumed.releases == 3 and resumed.rounds_done == 3
    assert np.array_equal(resumed.global_params["p0"], state.global_params["p0"])
    s2 = DPFedAvg(resumed, table, n_clients=4, clip_norm=1.0, max_releases=table.steps, seed=0)
    _round(s2, _Manager(4))
    assert resumed.releases == 4
    assert math.isclose(resumed.epsilon(),
                        certify(Mechanism(Gaussian(1.5), 1.0, "l2", 0.5, 4), DELTA).epsilon, rel_tol=1e-9)
    # a resume never reuses an earlier round's noise: release 3's generator, not release 0's
    assert not np.array_equal(table.noise.sample(6, round_rng(0, 3, 1)),
                              table.noise.sample(6, round_rng(0, 0, 1)))
    with pytest.raises(StateError, match="different clients"):
        FederationState.load(state.directory, table, dict(cfg, clients=5), 0.5)
    # a shortened ledger is refused (the privacy record must never move backwards)
    short = PrivacyLedger(DELTA, table.certified_epsilon)
    short.record(resumed.mechanism, 1)
    (state.directory / "ledger.json").write_text(short.to_json())
    with pytest.raises(StateError, match="shortened"):
        FederationState.load(state.directory, table, cfg, 0.5)
    (state.directory / "ledger.json").write_text(resumed.ledger.to_json())
    blob = bytearray((state.directory / "global.safetensors").read_bytes())
    blob[-3] ^= 0x40
    (state.directory / "global.safetensors").write_bytes(bytes(blob))
    with pytest.raises(StateError, match="checksum"):
        FederationState.load(state.directory, table, cfg, 0.5)


def test_default_randomness_is_fresh_and_a_seed_replays_with_a_warning(tmp_path, tables):
    """The server's sampling and noise came from seed 0 by default, so anyone could replay them.
    By default every round now draws from a new OS-keyed ChaCha20 generator: two federations on the
    same updates release different adapters and sample differently. A seed reproduces a federation
    exactly, and warns."""
    table = tables["q05"]
    assert isinstance(round_rng(None, 0, 1), SecureRandom)

    def federation(name, **seed):
        d = tmp_path / name
        d.mkdir()
        state = FederationState.create(d, table, {"p0": np.zeros(50)}, {"k": 1}, table.sampling_rate)
        strategy = DPFedAvg(state, table, n_clients=8, clip_norm=1.0, max_releases=table.steps, **seed)
        picks = [[p.cid for p, _ in _round(strategy, _Manager(8))] for _ in range(2)]
        return state.global_params["p0"], picks

    with warnings.catch_warnings():
        warnings.simplefilter("error", KnownSeedWarning)          # no warning without a seed
        (a, picks_a), (b, picks_b) = federation("a"), federation("b")
    assert not np.array_equal(a, b)
    assert picks_a != picks_b                  # 2 rounds of 8 Poisson(1/2) draws: equal w.p. 2^-16
    with pytest.warns(KnownSeedWarning, match="seed 5 makes the sampling and the noise reproducible"):
        c, picks_c = federation("c", seed=5)
    with pytest.warns(KnownSeedWarning):
        d, picks_d = federation("d", seed=5)
    assert np.array_equal(c, d) and picks_c == picks_d


def test_organisation_local_sampling_is_fresh_by_default():
    """Each organisation's local Poisson sampling (and its DP-SGD noise, the same generator) came
    from a seed derived from --seed 0. By default it is now OS-keyed: two organisations built alike
    sample differently; a seed reproduces the draws, and warns."""
    from finetune.federated.client import OrganisationClient, build_model

    model = build_model("tiny", "lora", 0)
    ids, mask = np.zeros((40, 8), np.int32), np.ones((40, 8), np.float32)

    def draws(**seed):
        client = OrganisationClient(model, ids, mask, local_steps=1, local_batch=16, **seed)
        return [client.sampler.sample().tolist() for _ in range(5)]

    with warnings.catch_warnings():
        warnings.simplefilter("error", KnownSeedWarning)
        assert draws() != draws()              # 200 Bernoulli(0.4) inclusions
    with pytest.warns(KnownSeedWarning):
        assert draws(seed=3) == draws(seed=3)


def test_restarted_organisation_continues_its_record_level_ledger(tmp_path):
    """A resumed federation restarts the organisation processes; each one built a fresh
    record-level guard and overwrote its saved ledger, so the record-level epsilon restarted from
    zero (an under-count). Now the saved ledger is read back: 1 step spent of the table's 2
    leaves 1, and the epsilon is the accountant's for 1 step, then 2."""
    from finetune.federated.client import OrganisationClient, build_model
    from finetune.federated.state import atomic_write

    model = build_model("tiny", "lora", 0)
    ids, mask = np.zeros((40, 8), np.int32), np.ones((40, 8), np.float32)
    rec_table = _table(tmp_path / "rec.npz", 1.0, 0.25, 2)
    path = str(tmp_path / "client-0.ledger.json")
    first = OrganisationClient(model, ids, mask, local_steps=1, record_table=rec_table,
                               record_ledger_path=path)
    first.guard.record_step()
    atomic_write(path, first.guard.ledger.to_json().encode())     # what fit() saves every round
    again = OrganisationClient(model, ids, mask, local_steps=1, record_table=rec_table,
                               record_ledger_path=path)
    assert again.guard.ledger.steps == 1 and again.guard.remaining() == 1
    eps = [certify(Mechanism(Gaussian(1.0), 1.0, "l2", 0.25, t), DELTA).epsilon for t in (1, 2)]
    assert math.isclose(again.guard.epsilon_spent(), eps[0], rel_tol=1e-9)
    again.guard.record_step()
    assert again.guard.remaining() == 0
    assert math.isclose(again.guard.epsilon_spent(), eps[1], rel_tol=1e-9)


STUB_CLIENT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import flwr as fl
    index, address, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    class C(fl.client.NumPyClient):
        rounds = 0
        def get_properties(self, config):
            return {"organisation": index}
        def fit(self, parameters, config):
            C.rounds += 1
            if index == 2 and C.rounds == 1:      # the organisation that dies mid-round
                open(marker, "w").close()
                time.sleep(120)
            return [p + 0.01 * (index + 1) for p in parameters], 1, {}
    fl.client.start_client(server_address=address, client=C().to_client(), insecure=True)
""")


def test_flower_federation_survives_a_client_killed_mid_round(tmp_path, tables):
    """Real Flower server (gRPC on 127.0.0.1) and three client processes; the third is killed
    while it trains in round 1. The round is released with the two updates that arrived, the same
    noise and the same divisor q K = 3; round 2 proceeds; every reply held only parameters."""
    from finetune.federated.__main__ import _free_port, serve

    table, k = tables["q1"], 3
    strategy, state = _strategy(tmp_path, table, [(40,), (2, 5)], n_clients=k)
    address = f"127.0.0.1:{_free_port()}"
    script = tmp_path / "stub_client.py"
    script.write_text(STUB_CLIENT)
    marker = tmp_path / "in_fit"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(script), str(i), address, str(marker)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(k)]

    def killer():
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        procs[2].kill()

    threading.Thread(target=killer, daemon=True).start()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve(address, strategy, 2, round_timeout=60)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    h1, h2 = state.history
    assert (h1["sampled"], h1["received"], h1["failed"]) == (3, 2, 1)
    assert (h2["connected"], h2["received"]) == (2, 2)
    # and the record says which organisation: killed in round 1 (failed), gone in round 2 (absent)
    assert (h1["failed_organisations"], h1["absent"]) == ([2], [])
    assert (h2["failed_organisations"], h2["absent"]) == ([], [2])
    assert state.releases == 2
    # round 1 = (update of client 0 + client 1 + C Z) / (q K) with K = 3 (not 2)
    n = 50
    z = table.noise.sample(n, round_rng(0, 0, 1))
    after1 = (0.01 + 0.02 + z) / 3.0
    z2 = table.noise.sample(n, round_rng(0, 1, 1))
    after2 = after1 + (0.01 + 0.02 + z2) / 3.0   # the same two clients (client 2 is gone)
    got = np.concatenate([state.global_params[nm].reshape(-1) for nm in strategy.names])
    assert np.allclose(got, after2, atol=1e-5)  # float32 transport of the adapter
    # what travelled from the clients: the adapter tensors, a constant count, no metrics
    assert len(strategy.messages) == 4
    for m in strategy.messages:
        assert m["shapes"] == strategy.shapes and m["num_examples"] == 1 and m["metrics"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_mindspore_client_reply_holds_only_the_trained_parameters(tmp_path, tables, mode):
    """The Flower FitRes of a real organisation: exactly the trainable adapter tensors (by shape and
    order), num_examples 1, empty metrics; the frozen base model never travels. With a record-level
    table its own ledger charges every local step."""
    import mindspore as ms

    from finetune.federated.client import OrganisationClient, build_model
    from finetune.models.peft import trainable_parameter_names
    from finetune.models.tokenizer import load_tokenizer
    from finetune.data import encode_texts

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    model = build_model("tiny", "lora", 0)
    tok = load_tokenizer(model.config.vocab_size)
    recs = generate_records(40, seed=1)
    ids, mask, _ = encode_texts(tok, [r["text"] for r in recs], 32)
    rec_table = _table(tmp_path / "rec.npz", 1.0, 0.25, 2)
    client = OrganisationClient(model, ids, mask, local_steps=2, micro_batch=16, record_table=rec_table,
                                record_ledger_path=str(tmp_path / "rec_ledger.json"), seed=0)
    names = sorted(trainable_parameter_names(model))
    params = dict(model.parameters_and_names())
    sent = [params[n].asnumpy().copy() for n in names]
    res = client.numpy_client().to_client().fit(FitIns(ndarrays_to_parameters(sent), {}))
    got = parameters_to_ndarrays(res.parameters)
    assert [a.shape for a in got] == [params[n].shape for n in names]
    assert all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert res.num_examples == 1 and dict(res.metrics) == {}
    assert sum(a.size for a in got) < 0.1 * sum(p.size for p in model.get_parameters())
    assert any(not np.array_equal(a, b) for a, b in zip(got, sent))   # it did train
    led = PrivacyLedger.from_json((tmp_path / "rec_ledger.json").read_text())
    assert led.steps == 2
    assert math.isclose(led.epsilon(), certify(Mechanism(Gaussian(1.0), 1.0, "l2", 0.25, 2), DELTA).epsilon,
                        rel_tol=1e-9)
    # the second round exhausts the 4 certified local steps; a third returns a zero update
    client.numpy_client().to_client().fit(FitIns(ndarrays_to_parameters(got), {}))
    again = parameters_to_ndarrays(client.numpy_client().to_client().fit(
        FitIns(res.parameters, {})).parameters)
    assert all(np.array_equal(a, b) for a, b in zip(again, got))
    with pytest.raises(RuntimeError, match="base model differs"):
        client.fit(sent, {"base_sha256": "0" * 64})


def _cli(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "finetune.federated", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=900)


def _main(capsys, *argv):
    from finetune.federated.__main__ import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:          # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def test_cli_user_errors_are_one_line(tmp_path, tables, capsys):
    write_jsonl(generate_records(60, seed=0), tmp_path / "d.jsonl")
    base = ["--clients", 3, "--table", tables["q1_path"], "--method", "lora", "--model", "tiny",
            "--data", tmp_path / "d.jsonl"]
    (tmp_path / "exists").mkdir()
    (tmp_path / ".partial_run.partial").mkdir()
    cases = [(["--rounds", 2, "--out", tmp_path / "exists"], "exists; pass --overwrite"),
             (["--rounds", 99, "--out", tmp_path / "new"], "exceeds the 6 rounds"),
             (["--rounds", 2, "--client-rate", 0.5, "--out", tmp_path / "new"], "does not match"),
             (["--rounds", 2, "--out", tmp_path / "partial_run"], "pass --resume"),
             (["--rounds", 2, "--out", tmp_path / "new", "--resume"], "no interrupted federation")]
    for extra, message in cases:
        code, err = _main(capsys, *base, *extra)
        assert code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
    code, err = _main(capsys, *base, "--rounds", 0, "--out", tmp_path / "new")
    assert code == 2 and "--rounds must be >= 1" in err
    assert not (tmp_path / "new").exists()


def _in_process(monkeypatch, script=None):
    """Run ``python -m finetune.federated`` in this process without organisation processes: the
    stubbed ``serve`` drives the real strategy for the requested rounds, with the organisations
    ``script(round) -> (connected indices, failing indices)`` (default: all connected, none fail)
    returning zero updates. Returns the list of client counts ``start_clients`` was called with."""
    import finetune.federated.__main__ as cli

    started = []
    monkeypatch.setattr(cli, "start_clients", lambda address, n, cfg, logs: started.append(n) or [])

    def serve(address, strategy, rounds, round_timeout):
        for r in range(rounds):
            connected, fail = script(r) if script else (range(strategy.n_clients), ())
            manager = _Manager(0)
            manager.clients = {f"node-{i:03d}": _Proxy(f"node-{i:03d}", i) for i in connected}
            _round(strategy, manager, fail=fail)

    monkeypatch.setattr(cli, "serve", serve)
    # no processes start here: no memory check
    monkeypatch.setattr(cli, "available_memory", lambda: None, raising=False)
    return started


def _fed_args(tmp_path, tables, out, clients=3, rounds=2):
    data = tmp_path / "d.jsonl"
    if not data.exists():
        write_jsonl(generate_records(150, seed=0, people=40), data)
    return ["--clients", clients, "--rounds", rounds, "--table", tables["q1_path"], "--method", "lora",
            "--model", "tiny", "--data", data, "--out", tmp_path / out, "--seq-len", 16, "--quiet"]


def _replayed_adapter(table, seed, rounds, k, clip=1.0):
    """What anyone can compute for a federation of zero updates run with ``--seed seed`` (q = 1,
    server lr 1): the initial tiny LoRA adapter plus, per round r, C * Z_r / (q K) with Z_r the
    table's draw from the generator of release r."""
    from finetune.federated.client import build_model

    model = build_model("tiny", "lora", seed)
    init = {n: p.asnumpy().astype(np.float64) for n, p in model.parameters_and_names() if p.requires_grad}
    names = sorted(init)
    flat = np.concatenate([init[n].reshape(-1) for n in names])
    for r in range(rounds):
        flat = flat + clip * table.noise.sample(flat.size, round_rng(seed, r, 1)) / k
    bounds = np.cumsum([0] + [init[n].size for n in names])
    return {n: flat[a:b].reshape(init[n].shape) for n, a, b in zip(names, bounds[:-1], bounds[1:])}


def test_cli_default_run_cannot_be_replayed_from_the_old_default_seed(tmp_path, tables, capsys,
                                                                      monkeypatch):
    """The replay attack of the issue: the old default was --seed 0, so anyone could recompute a
    default federation's noise. Now a default run draws from the OS: its adapter is not the one
    that --seed 0 yields; the outputs record secure randomness and no seed; no warning."""
    from safetensors.numpy import load_file

    _in_process(monkeypatch)
    code, err = _main(capsys, *_fed_args(tmp_path, tables, "fed"))
    assert code == 0, err
    got = load_file(str(tmp_path / "fed" / "adapter.safetensors"))
    replay = _replayed_adapter(tables["q1"], 0, rounds=2, k=3)
    assert got.keys() == replay.keys()
    assert not any(np.allclose(got[n], replay[n], rtol=1e-5, atol=1e-6) for n in got)
    assert "--seed given" not in err
    m = json.loads((tmp_path / "fed" / "metrics.json").read_text())
    cfg = json.loads((tmp_path / "fed" / "federation.json").read_text())["config"]
    assert (m["seed"], m["secure_rng"], cfg["seed"], cfg["secure"]) == (None, True, None, True)
    assert m["init_seed"] == 0                 # public: the base model and the split can be rebuilt


def test_cli_seed_is_replayable_and_says_so(tmp_path, tables, capsys, monkeypatch):
    """With --seed the federation is reproducible by anyone: its adapter is exactly the replay
    computed from the seed alone. The run prints the one-line warning and records the seed."""
    from safetensors.numpy import load_file

    _in_process(monkeypatch)
    code, err = _main(capsys, *_fed_args(tmp_path, tables, "fed"), "--seed", 4)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "--seed given" in line]
    assert len(warned) == 1 and "seed 4 makes the sampling and the noise reproducible" in warned[0], err
    got = load_file(str(tmp_path / "fed" / "adapter.safetensors"))
    replay = _replayed_adapter(tables["q1"], 4, rounds=2, k=3)
    assert all(np.allclose(got[n], replay[n], rtol=1e-5, atol=1e-6) for n in replay)
    m = json.loads((tmp_path / "fed" / "metrics.json").read_text())
    cfg = json.loads((tmp_path / "fed" / "federation.json").read_text())["config"]
    assert (m["seed"], m["secure_rng"], cfg["seed"], cfg["secure"], m["init_seed"]) == (4, False, 4, False, 4)


def test_cli_reports_missing_organisations_and_no_gain_over_the_base(tmp_path, tables, capsys,
                                                                      monkeypatch):
    """A federation that lost an organisation never said so, nor that the adapter did not beat the
    base model. Organisation 1 fails in round 1, organisation 2 is gone from round 2 on: the round
    records, metrics.json and the closing summary name them with their rounds; the base model's
    validation perplexity is the untuned model's, and no gain is flagged."""
    from finetune.data import load_dataset
    from finetune.federated.client import build_model
    from finetune.models.tokenizer import load_tokenizer
    from finetune.train import perplexity

    _in_process(monkeypatch, lambda r: ([0, 1, 2], [1]) if r == 0 else ([0, 1], []))
    code, err = _main(capsys, *_fed_args(tmp_path, tables, "fed", rounds=3), "--seed", 1)
    assert code == 0, err
    hist = json.loads((tmp_path / "fed" / "federation.json").read_text())["history"]
    assert [(h["absent"], h["failed_organisations"]) for h in hist] == [([], [1]), ([2], []), ([2], [])]
    m = json.loads((tmp_path / "fed" / "metrics.json").read_text())
    assert m["missing_organisations"] == {"1": {"rounds": 1, "absent": [], "failed": [1]},
                                          "2": {"rounds": 2, "absent": [2, 3], "failed": []}}
    assert "organisation 1 sent no update in 1 of 3 rounds (failed in round 1)" in err
    assert "organisation 2 sent no update in 2 of 3 rounds (absent in rounds 2-3)" in err
    # the base: the untuned model (as built, LoRA B = 0) on the held-out split
    model = build_model("tiny", "lora", 1)
    val = load_dataset(tmp_path / "d.jsonl", load_tokenizer(model.config.vocab_size), seq_len=16, seed=1).val
    assert math.isclose(m["val_perplexity_base"], perplexity(model, val.ids, val.mask), rel_tol=1e-6)
    assert m["improved_over_base"] == (m["val_perplexity"] < m["val_perplexity_base"])
    assert m["val_split"].startswith("held-out")
    flagged = "no improvement over the base model" in err
    assert flagged == (not m["improved_over_base"])
    # both verdicts, on their own
    from finetune.federated.__main__ import warnings_for

    quiet = dict(m, missing_organisations={})
    assert warnings_for(dict(quiet, val_perplexity=5139.0, val_perplexity_base=5137.0,
                             improved_over_base=False)) == [
        "no improvement over the base model: validation perplexity 5139 against 5137 before the "
        "federation (held-out split)"]
    assert warnings_for(dict(quiet, val_perplexity=14.2, val_perplexity_base=15.0,
                             improved_over_base=True)) == []


def test_cli_refuses_more_organisations_than_the_corpus_or_the_memory_holds(tmp_path, tables, capsys,
                                                                           monkeypatch):
    """--clients 500 on a 40-person corpus started one MindSpore process per client. Now a client
    count is refused in one line before any process starts when some organisation would hold no
    one, or when the processes would not fit in the available memory (numbers in the message)."""
    import re

    import finetune.federated.__main__ as cli
    from finetune.data import load_records, split_records

    started = _in_process(monkeypatch)
    code, err = _main(capsys, *_fed_args(tmp_path, tables, "fed", clients=500))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--clients 500" in err, err
    assert started == [] and not (tmp_path / "fed").exists() and not (tmp_path / ".fed.partial").exists()
    limit = int(re.search(r"use --clients (\d+) or fewer", err).group(1))
    train, _ = split_records(load_records(tmp_path / "d.jsonl"), None, 0)
    assert min(len(s) for s in split_by_person(train, limit, 0)) >= 1       # the limit is exact
    assert min(len(s) for s in split_by_person(train, limit + 1, 0)) == 0
    # memory: 3 tiny organisations do not fit in 2.5 GB (about 0.93 GB each); 2 do
    each = cli.client_memory_bytes(1_077_760)
    assert 2 * each <= 2.5e9 < 3 * each
    monkeypatch.setattr(cli, "available_memory", lambda: int(2.5e9))
    code, err = _main(capsys, *_fed_args(tmp_path, tables, "fed", clients=3))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "2.5 GB is available" in err and "use --clients 2 or fewer" in err, err
    assert started == [] and not (tmp_path / ".fed.partial").exists()
    code, err = _main(capsys, *_fed_args(tmp_path, tables, "fed", clients=2))
    assert code == 0 and started == [2], err


@pytest.mark.slow
def test_cli_real_default_federations_differ_seeded_ones_repeat(tmp_path, tables):
    """End to end with organisation processes: two default federations on the same data end with
    different adapters; two with --seed 3 end with identical ones, and the warning is printed."""
    from safetensors.numpy import load_file

    write_jsonl(generate_records(60, seed=0, people=30), tmp_path / "d.jsonl")
    got = {}
    for name, extra in (("a", []), ("b", []), ("s1", ["--seed", 3]), ("s2", ["--seed", 3])):
        r = _cli("--clients", 2, "--rounds", 1, "--table", tables["q1_path"], "--method", "lora",
                 "--model", "tiny", "--data", tmp_path / "d.jsonl", "--out", tmp_path / name,
                 "--local-steps", 1, "--seq-len", 16, "--quiet", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("warning: --seed given" in r.stderr) == bool(extra), r.stderr[-2000:]
        got[name] = load_file(str(tmp_path / name / "adapter.safetensors"))
    assert any(not np.array_equal(got["a"][k], got["b"][k]) for k in got["a"])
    assert all(np.array_equal(got["s1"][k], got["s2"][k]) for k in got["s1"])


@pytest.mark.slow
def test_cli_three_organisations_end_to_end_and_resume(tmp_path, tables):
    """python -m finetune.federated with 3 MindSpore organisations on the tiny model: the output
    has the shape of a python -m finetune run and its ledger is the accountant's; an interrupted
    federation (server killed) resumes with its ledger and finishes."""
    write_jsonl(generate_records(150, seed=0, people=40), tmp_path / "d.jsonl")
    out = tmp_path / "fed"
    args = ["--clients", 3, "--rounds", 2, "--table", tables["q1_path"], "--method", "lora",
            "--model", "tiny", "--data", tmp_path / "d.jsonl", "--out", out, "--local-steps", 2,
            "--seq-len", 32, "--quiet"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"adapter.safetensors", "ledger.json", "metrics.json", "federation.json"} <= set(os.listdir(out))
    m = json.loads((out / "metrics.json").read_text())
    direct = certify(Mechanism(Gaussian(2.0), 1.0, "l2", 1.0, 2), DELTA).epsilon
    assert m["steps"] == 2 and math.isclose(m["epsilon_spent"], direct, rel_tol=1e-9)
    assert m["failed_updates"] == 0 and m["val_perplexity"] > 1
    # finetune.evaluate reads the run unchanged: same adapter, same validation perplexity
    from finetune.data import load_dataset
    from finetune.evaluate import load_run
    from finetune.models.tokenizer import load_tokenizer
    from finetune.train import perplexity

    metrics, model, _ = load_run(str(out))
    data = load_dataset(tmp_path / "d.jsonl", load_tokenizer(model.config.vocab_size), seq_len=32)
    assert math.isclose(perplexity(model, data.val.ids, data.val.mask), m["val_perplexity"], rel_tol=1e-3)

    # kill the server after its first round, then resume: the ledger continues, never restarts
    out2 = tmp_path / "fed2"
    args2 = [a if a != out else out2 for a in args]
    args2[args2.index("--rounds") + 1] = 3
    proc = subprocess.Popen([sys.executable, "-m", "finetune.federated", *map(str, args2)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".fed2.partial"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if json.loads((partial / "federation.json").read_text())["rounds_done"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = PrivacyLedger.from_json((partial / "ledger.json").read_text())
    assert 1 <= killed.steps < 3 and not out2.exists()
    r = _cli(*args2, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    final = PrivacyLedger.from_json((out2 / "ledger.json").read_text())
    assert final.steps >= 3 and final.steps >= killed.steps
    assert math.isclose(final.epsilon(), certify(Mechanism(Gaussian(2.0), 1.0, "l2", 1.0, final.steps),
                                                 DELTA).epsilon, rel_tol=1e-9)
    assert json.loads((out2 / "federation.json").read_text())["rounds_done"] == 3
