"""Model-facing helpers for evaluation: per-text losses, generation and generation latency.

``LMScorer`` wraps a ``finetune.models.gpt2.GPT2LMHeadModel`` and a tokenizer with ``encode(text) ->
list[int]`` and ``decode(ids) -> str``. Every batch is padded to one fixed shape [batch, seq_len]
(MindSpore recompiles for each new input shape), and padding is masked out of the loss. ``seq_len``
must lie in [2, n_positions] (a text is scored on its next-token predictions); it is never
shortened silently. Error messages name a text by its index, never by its content (it may be a
private record).
"""
from __future__ import annotations

import time

import numpy as np


class LMScorer:
    def __init__(self, model, tokenizer, seq_len: int = 64, batch_size: int = 32,
                 progress: bool = False, name: str = "model"):
        if not 2 <= int(seq_len) <= model.config.n_positions:
            raise ValueError(f"seq_len must be in [2, n_positions = {model.config.n_positions}], "
                             f"got {seq_len}")
        self.model = model
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.name = name
        self._loss_fn = None

    # -------------------------------------------------------------------------- losses
    def _encode(self, texts):
        ids = []
        eos = getattr(self.tokenizer, "eos_id", None)  # training appends EOS (finetune.data)
        for i, t in enumerate(texts):
            x = list(self.tokenizer.encode(t)) + ([eos] if eos is not None else [])
            x = x[: self.seq_len]
            if len(x) < 2:  # the text itself may be private: its index only, never its content
                raise ValueError(f"text {i} of {len(texts)} is too short to score (fewer than 2 "
                                 "tokens)")
            ids.append(x)
        return ids

    def _loss(self):
        if self._loss_fn is None:
            import mindspore as ms

            model = self.model

            def f(ids, mask):
                return model.loss(ids, mask)

            self._loss_fn = ms.jit(f)
        return self._loss_fn

    def token_losses(self, texts):
        """(mean token NLL, number of predicted tokens) per text, as two float64 arrays."""
        from mindspore import Tensor

        texts = list(texts)
        enc = self._encode(texts)
        means = np.empty(len(enc))
        counts = np.empty(len(enc))
        fn = self._loss()
        it = range(0, len(enc), self.batch_size)
        if self.progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"loss ({self.name})", unit="batch", leave=False)
        for s in it:
            chunk = enc[s: s + self.batch_size]
            ids = np.zeros((self.batch_size, self.seq_len), np.int32)
            mask = np.zeros((self.batch_size, self.seq_len), np.float32)
            for i, x in enumerate(chunk):
                ids[i, : len(x)] = x
                mask[i, : len(x)] = 1.0
            mask[len(chunk):, :2] = 1.0  # padding rows: keep them well defined, ignored below
            out = fn(Tensor(ids), Tensor(mask)).asnumpy().astype(np.float64)
            means[s: s + len(chunk)] = out[: len(chunk)]
            counts[s: s + len(chunk)] = [len(x) - 1 for x in chunk]
        return means, counts

    def losses(self, texts) -> np.ndarray:
        """Mean token negative log-likelihood (nats) of each text: the membership-inference signal."""
        return self.token_losses(texts)[0]

    def log_perplexity(self, texts) -> np.ndarray:
        """Summed negative log-likelihood (nats) of each text: the Secret Sharer's log-perplexity."""
        m, c = self.token_losses(texts)
        return m * c

    def perplexity(self, texts) -> float:
        """exp(total NLL / total predicted tokens) over ``texts`` (token-weighted)."""
        m, c = self.token_losses(texts)
        return float(np.exp(np.sum(m * c) / np.sum(c)))

    # ---------------------------------------------------------------------- generation
    def generate(self, prompts, max_new_tokens: int = 48, top_k: int = 40, seed: int = 0,
                 batch_size: int | None = None):
        """Sampled continuations (text, prompt excluded) of each prompt, in fixed-size batches."""
        from finetune.models.gpt2 import generate

        bs = int(batch_size or self.batch_size)
        enc = [list(self.tokenizer.encode(p)) or [0] for p in prompts]
        longest = max(len(x) for x in enc)
        out = []
        it = range(0, len(enc), bs)
        if self.progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"generate ({self.name})", unit="batch", leave=False)
        for s in it:
            chunk = enc[s: s + bs]
            n = len(chunk)
            padded = chunk + [chunk[0]] * (bs - n)  # fixed batch shape; extra rows dropped
            # one buffer length for every batch (no recompilation): generate a few extra tokens
            # for batches of shorter prompts and cut every continuation to max_new_tokens
            extra = longest - max(len(x) for x in chunk)
            eos = getattr(self.tokenizer, "eos_id", None)
            gen = generate(self.model, padded, max_new_tokens + extra, top_k=top_k, seed=seed + s,
                           eos_id=eos)
            for g in gen[:n]:  # a continuation ends at the first end-of-text token
                g = g[:max_new_tokens]
                if eos is not None and eos in g:
                    g = g[: g.index(eos)]
                out.append(self.tokenizer.decode(g))
        return out

    def generation_seconds(self, prompts, max_new_tokens: int = 32, repeats: int = 3,
                           seed: int = 0, warmup: bool = True) -> float:
        """Fastest of ``repeats`` wall times to generate for ``prompts`` (greedy); with ``warmup``
        one untimed call first (compilation)."""
        from finetune.models.gpt2 import generate

        enc = [list(self.tokenizer.encode(p)) or [0] for p in prompts]
        if warmup:
            generate(self.model, enc, max_new_tokens, top_k=0, seed=seed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(self.model, enc, max_new_tokens, top_k=0, seed=seed)
            times.append(time.perf_counter() - t0)
        return float(np.min(times))
