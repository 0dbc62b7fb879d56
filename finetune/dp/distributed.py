"""Data-parallel DP fine-tuning across processes started by MindSpore's launcher ``msrun``.

Correct DP-SGD with N workers (docs/soundness.md rules 1 and 7):

1. **One global Poisson batch per step.** Every worker holds the same sampling generator (same
   seed, or for ``secure=True`` a ChaCha20 key drawn by rank 0 from ``os.urandom`` and shared), so
   all workers draw the *same* global batch with the certified rate ``q`` (global expected batch /
   dataset size) and each takes its shard ``indices[rank::N]``. No example is dropped or repeated.
2. **Each worker clips its own examples** and sums them (``finetune.dp.per_example``).
3. **The clipped sums are summed across workers exactly**: float64 host sums are exchanged
   bit-for-bit (MindSpore 2.10's CPU ``AllReduce`` only takes float32/float16, so the 64-bit words
   travel as 16-bit pieces in float32, which add to zero padding exactly) and added in rank order,
   so every worker holds the identical global sum.
4. **The noise is added once**: every worker draws the identical noise vector from the shared noise
   generator and adds it to the identical global sum. The released value is ``sum + C * Z`` with
   one ``Z`` -- not N independent draws mean-reduced (which would divide the noise variance by N
   and void the certificate). All workers then apply the identical update.

Trust model: like every data-parallel trainer, workers exchange un-noised clipped sums (and, in
secure mode, the shared ChaCha20 key) over the MindSpore collective link; the workers and their
interconnect must be trusted. On one machine this is loopback.

Use::

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True my_train.py

    from finetune.dp.distributed import Distributed, DistributedDPOptimizer, shard
    dist = Distributed.from_env()                      # rank/world from msrun; world 1 otherwise
    dp = DistributedDPOptimizer(opt, model, table, dist=dist, seed=0, max_grad_norm=1.0,
                                expected_batch_size=q * n)
    sampler = PoissonSampler(n, q, steps, rng=dp.rng)  # the shared generator
    for idx in sampler:                                # identical global batch on every rank
        mine = shard(idx, dist)
        dp.step([([ids[m.indices], mask[m.indices]], m.mask) for m in micro_batches(mine, 16)])

or simply ``finetune.train.train_distributed(...)`` (same arguments and result as ``finetune.train.train``).
Workers need the virtualenv first on ``PATH`` (msrun starts ``python`` from ``PATH``). msrun also
accepts a module: ``msrun --worker_num=2 --local_worker_num=2 --join=True python -m pkg.mod ARGS``.

Caution: msrun runs the command ``N + 1`` times (N workers and one scheduler). A program that does
not call ``Distributed.from_env()`` first (the scheduler's ``init()`` serves the cluster and ends
that process) and does not share its batches and noise this way trains ``N + 1`` independent
models on the same data, each with its own noise: ``N + 1`` releases, not one.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .optimizer import DPOptimizer

__all__ = ["Distributed", "SharedSecureRandom", "DistributedDPOptimizer", "shard",
           "DistributedError"]

_CHUNK_WORDS = 1 << 20  # 64-bit words per collective call (4 float32 each, per rank)


class DistributedError(RuntimeError):
    """Workers disagree (different seeds, diverged weights) or the launch is inconsistent."""


class Distributed:
    """Rank, world size and exact host-side collectives (identity when ``world_size == 1``)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise DistributedError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self._op = None

    @classmethod
    def from_env(cls) -> "Distributed":
        """Join the MindSpore cluster when started by ``msrun`` (``MS_ROLE`` set); world 1 otherwise.

        Call it before any other MindSpore work. In msrun's scheduler process it does not return.
        """
        role = os.environ.get("MS_ROLE")
        if role not in ("MS_WORKER", "MS_SCHED"):
            return cls(0, 1)
        # Join even with one worker: msrun still starts a scheduler that must be served, and a
        # scheduler that skipped init() would go on to train (and write) a model of its own.
        from mindspore.communication import get_group_size, get_rank, init

        # msrun also runs the script as the scheduler process (MS_ROLE=MS_SCHED): there init()
        # serves the cluster and ends the process when the workers are done.
        init()
        if role == "MS_SCHED":  # never let the scheduler go on to train a model of its own
            raise SystemExit(0)
        return cls(get_rank(), get_group_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------------
    def _allreduce_f32(self, x: np.ndarray) -> np.ndarray:
        from mindspore import Tensor, ops

        if self._op is None:
            self._op = ops.AllReduce()
        return self._op(Tensor(x)).asnumpy()

    @staticmethod
    def _encode(words: np.ndarray, rank: int, world: int) -> np.ndarray:
        """[world, 4n] float32, zero except row ``rank`` = the words as exact 16-bit pieces."""
        buf = np.zeros((world, 4 * words.size), np.float32)
        buf[rank] = words.view(np.uint16).astype(np.float32)
        return buf

    @staticmethod
    def _decode(summed: np.ndarray, world: int) -> np.ndarray:
        """Inverse of summing every rank's ``_encode``: [world, n] uint64, bit-exact."""
        return np.ascontiguousarray(summed.astype(np.uint16)).view(np.uint64).reshape(world, -1)

    def gather_words(self, words) -> np.ndarray:
        """All ranks' uint64 vectors (same length on every rank) -> [world, n], bit-exact.

        Each rank fills its own row of a zero buffer with 16-bit pieces (exact in float32) and the
        buffers are all-reduced: x + 0 + ... + 0 is exact, so every row arrives unchanged.
        """
        words = np.ascontiguousarray(np.asarray(words, dtype=np.uint64).reshape(-1))
        if self.world_size == 1:
            return words[None, :].copy()
        out = np.empty((self.world_size, words.size), np.uint64)
        for start in range(0, max(words.size, 1), _CHUNK_WORDS):
            part = words[start:start + _CHUNK_WORDS]
            summed = self._allreduce_f32(self._encode(part, self.rank, self.world_size))
            out[:, start:start + part.size] = self._decode(summed, self.world_size)
        return out

    def allreduce_sum_f64(self, x) -> np.ndarray:
        """Exact-transport float64 sum over ranks, added in rank order (identical on every rank)."""
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1))
        if self.world_size == 1:
            return x.copy()
        rows = self.gather_words(x.view(np.uint64)).view(np.float64)
        total = rows[0].copy()
        for r in range(1, self.world_size):
            total += rows[r]
        return total

    def broadcast_bytes(self, data: bytes | None, n: int, root: int = 0) -> bytes:
        """``n`` bytes (a multiple of 8) from ``root`` to every rank."""
        if n % 8:
            raise ValueError("n must be a multiple of 8")
        mine = np.zeros(n // 8, np.uint64)
        if self.rank == root:
            if data is None or len(data) != n:
                raise ValueError(f"root must pass exactly {n} bytes")
            mine = np.frombuffer(data, dtype=np.uint64).copy()
        return self.gather_words(mine)[root].tobytes()

    def check_same(self, what: str, value: bytes) -> None:
        """Raise DistributedError unless every rank passes the same ``value`` (compared by hash)."""
        h = np.frombuffer(hashlib.blake2b(value, digest_size=8).digest(), dtype=np.uint64)
        rows = self.gather_words(h)
        if not (rows == rows[0]).all():
            raise DistributedError(f"workers disagree on {what} (rank {self.rank} of {self.world_size})")

    def assert_in_sync(self, params) -> None:
        """Raise DistributedError unless all ranks hold bit-identical parameters."""
        hasher = hashlib.blake2b(digest_size=16)
        for p in params:
            hasher.update(np.ascontiguousarray(p.asnumpy()).tobytes())
        self.check_same("the model parameters (replicas diverged)", hasher.digest())

    # -- shared randomness ---------------------------------------------------------------------
    def shared_rng(self, seed: int | None = None, secure: bool = False):
        """The same generator on every rank: seeded PCG64 (seeds checked equal), or ChaCha20 keyed
        by 256 random bits from rank 0's ``os.urandom`` (docs/soundness.md rule 8)."""
        from accountant.randomness import make_rng

        if secure:
            if seed is not None:
                raise ValueError("a secure generator cannot be seeded; drop the seed or secure=True")
            key = self.broadcast_bytes(os.urandom(48) if self.is_main else None, 48)
            return SharedSecureRandom(key[:32], key[32:])
        if seed is None:
            raise ValueError("data-parallel training needs a seed (or secure=True) so that all "
                             "workers draw the same Poisson batch and the same noise")
        self.check_same("the random seed", str(int(seed)).encode())
        return make_rng(seed=seed)


class SharedSecureRandom:
    """ChaCha20 keystream from a given key and nonce (``cryptography``), producing raw uint64 words;
    the same interface as ``accountant.randomness.SecureRandom`` (``random_raw``)."""

    def __init__(self, key: bytes, nonce: bytes):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        if len(key) != 32 or len(nonce) != 16:
            raise ValueError("ChaCha20 needs a 32-byte key and a 16-byte nonce")
        self._encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def random_raw(self, n: int) -> np.ndarray:
        stream = self._encryptor.update(bytes(8 * int(n)))
        return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def shard(indices, dist: Distributed) -> np.ndarray:
    """This rank's share of a global batch: every ``world_size``-th index from ``rank``."""
    return np.asarray(indices, dtype=np.int64).reshape(-1)[dist.rank::dist.world_size]


class DistributedDPOptimizer(DPOptimizer):
    """A ``finetune.dp.optimizer.DPOptimizer`` whose ``reduce_sum`` hook sums the workers' clipped
    sums and step statistics exactly (``Distributed.allreduce_sum_f64``) before the noise is added,
    and whose noise generator is shared, so the identical noise is added once to the global sum on
    every worker.

    Same arguments as ``DPOptimizer`` plus ``dist``; ``seed`` / ``secure`` select the shared
    generator (``rng`` is refused: a per-worker generator would add N different noises).
    """

    def __init__(self, optimizer, network, table=None, *, dist: Distributed | None = None,
                 seed: int | None = None, secure: bool = False, **kwargs):
        if "rng" in kwargs:
            raise ValueError("DistributedDPOptimizer builds its own shared generator; "
                             "pass seed or secure=True instead of rng")
        self.dist = dist if dist is not None else Distributed.from_env()
        if "reduce_sum" in kwargs:
            raise ValueError("DistributedDPOptimizer reduces across its workers itself; "
                             "do not pass reduce_sum")
        reduce_sum = self.dist.allreduce_sum_f64 if self.dist.world_size > 1 else None
        super().__init__(optimizer, network, table, rng=self.dist.shared_rng(seed, secure),
                         reduce_sum=reduce_sum, **kwargs)
        self.secure = bool(secure)
