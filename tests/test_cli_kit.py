"""The command lines' shared kit: one one-line parser, one Stopper (signal handling)."""
import os
import signal
import threading
from pathlib import Path
import time

import numpy as np

import pytest

from accountant import cli_common
from finetune import cli


def _send(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.05)           # the handler runs at the main thread's next bytecode


def test_first_signal_sets_the_flag_second_sigint_interrupts_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    with cli.Stopper(on_signal=seen.append) as stopper:
        assert not stopper.event.is_set()
        _send(signal.SIGTERM)
        assert stopper.event.is_set() and stopper.exit_code == 143 and seen == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
    with cli.Stopper() as stopper:
        _send(signal.SIGINT)
        assert stopper.event.is_set() and stopper.exit_code == 130
    assert {s: signal.getsignal(s) for s in before} == before


def test_outside_the_main_thread_the_stopper_does_nothing():
    before = signal.getsignal(signal.SIGINT)
    errors, flags = [], []

    def worker():
        try:
            with cli.Stopper() as stopper:
                flags.append(stopper.event.is_set())
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors == [] and flags == [False] and signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("parser_class,prefix", [(cli.OneLineParser, "prog: error: "),
                                                  (cli_common.OneLineParser, "error: ")])
def test_one_parser_reports_a_usage_mistake_in_one_line(parser_class, prefix, capsys):
    assert issubclass(cli.OneLineParser, cli_common.OneLineParser)   # one implementation
    p = parser_class(prog="prog")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as stop:
        p.parse_args(["--n", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(prefix)
    assert "(see: prog --help)" in err


def test_bookkeeping_refusals_are_one_error_class_not_a_message():
    """The CLI tells a refused method='bookkeeping' from an internal ValueError by its class
    (formerly by the words "book-keeping" in the message)."""
    import mindspore as ms
    from mindspore import Parameter, nn, ops

    from finetune.dp.per_example import BookkeepingError, PerExampleGradients, SharedLayerError

    class Scaled(nn.Cell):                   # a bare Parameter in the forward: no rule covers it
        def __init__(self):
            super().__init__()
            self.scale = Parameter(ms.Tensor(np.ones(4, np.float32)), name="scale")
            self.fc = nn.Dense(4, 3)

        def construct(self, x, y):
            return ops.cross_entropy(self.fc(x * self.scale), y, reduction="none")

    with pytest.raises(BookkeepingError, match="not covered"):
        PerExampleGradients(Scaled(), method="bookkeeping")
    assert issubclass(SharedLayerError, BookkeepingError)


def test_a_stopped_federation_begins_no_further_round(tmp_path):
    """python -m finetune.federated: after SIGTERM the strategy samples and charges no further
    round (the command then exits 143 with its work folder ready for --resume); before that, each
    round re-installs the Stopper, which Flower's start_server had replaced with its own handler."""
    from test_federated import _Manager, _round, _strategy, _table

    table = _table(tmp_path / "q1.npz", 2.0, 1.0, 6)
    strategy, state = _strategy(tmp_path, table, [(5,)], n_clients=4)
    with cli.Stopper() as stopper:
        strategy.stop = stopper.event
        signal.signal(signal.SIGTERM, signal.SIG_DFL)          # what Flower does at start
        _round(strategy, _Manager(4))
        assert state.releases == 1 and signal.getsignal(signal.SIGTERM) == stopper._handle
        _send(signal.SIGTERM)
        assert strategy.configure_fit(2, None, _Manager(4)) == []
        assert strategy.stopped_by_signal and state.releases == 1 and stopper.exit_code == 143


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_export_leaves_no_staging_folder(tmp_path, sig):
    """python -m finetune.export stopped while it writes: one line, exit 128 + signal, and neither
    --out nor its staging folder is left (SIGTERM used to kill it with the staging folder behind)."""
    import subprocess
    import sys

    (tmp_path / "run").mkdir()
    child = ("import sys, time\n"
             "from pathlib import Path\n"
             "from finetune import export\n"
             "def slow(args, stage):\n"
             "    (Path(stage) / 'adapter.safetensors').write_bytes(b'partial')\n"
             "    (Path(stage).parent / 'ready').write_text('')\n"
             "    time.sleep(600)\n"
             "export._write = slow\n"
             "sys.exit(export.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", child, "--run", "run", "--out", "exported"], cwd=tmp_path,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 128 + sig and err.count("\n") == 1 and "interrupted by" in err, (p.returncode, err)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ready", "run"]


def test_run_guarded_ends_every_outcome_in_one_line(capsys):
    def fails(exc):
        def work(stopper):
            assert isinstance(stopper, cli.Stopper)
            raise exc
        return work

    assert cli.run_guarded("prog", lambda stopper: 7, lambda: "x") == (0, 7)
    cases = [(cli.UserError("bad --x"), 2, "prog: error: bad --x\n"),
             (cli.Interrupted("stopped after 3 steps", 143), 143, "prog: stopped after 3 steps\n"),
             (KeyboardInterrupt(), 130, "prog: gone at once\n")]
    for exc, code, line in cases:
        assert cli.run_guarded("prog", fails(exc), lambda: "gone at once") == (code, None)
        assert capsys.readouterr().err == line


def test_sigterm_stops_a_federation_after_its_round_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    """python -m finetune.federated (in process, organisations stubbed as in test_federated): SIGTERM
    during round 1 of 3 ends the command after that round with one line and exit code 143, --out
    not written and the ledger holding one release; --resume then runs the remaining two rounds."""
    import json as _json

    import finetune.federated.__main__ as fed
    from accountant.ledger import PrivacyLedger
    from test_federated import _Manager, _fed_args, _in_process, _main, _round, _table

    _table(tmp_path / "q1.npz", 2.0, 1.0, 6)
    _in_process(monkeypatch)
    signalled = []

    def serve(address, strategy, rounds, round_timeout):
        for _ in range(rounds):
            _round(strategy, _Manager(strategy.n_clients))
            if not signalled:
                signalled.append(1)
                _send(signal.SIGTERM)

    monkeypatch.setattr(fed, "serve", serve)
    args = _fed_args(tmp_path, {"q1_path": tmp_path / "q1.npz"}, "fed", rounds=3)
    code, err = _main(capsys, *args, "--seed", 2)
    lines = [x for x in err.splitlines() if "--seed given" not in x]
    assert code == 143 and len(lines) == 1 and "interrupted after 1 of 3 rounds" in lines[0], err
    work = tmp_path / ".fed.partial"
    assert not (tmp_path / "fed").exists() and work.is_dir()
    assert PrivacyLedger.from_json((work / "ledger.json").read_text()).steps == 1
    code, err = _main(capsys, *args, "--seed", 2, "--resume")
    assert code == 0, err
    assert _json.loads((tmp_path / "fed" / "metrics.json").read_text())["steps"] == 3
    assert PrivacyLedger.from_json((tmp_path / "fed" / "ledger.json").read_text()).steps == 3
