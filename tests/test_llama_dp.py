"""DP fine-tuning of the Llama family through ``make_private``: every PEFT method and full
fine-tuning of llama-tiny run on book-keeping (not vmap) and learn.

The per-parameter exactness (per-example norms and clipped sums of every Llama parameter against
one-example-at-a-time float64 gradients, graph and PyNative, untied GQA and tied Qwen2 with q/k/v
biases, and units of several rows) is in tests/test_grad_harness.py.
"""
import numpy as np
import pytest

from mindspore import Tensor, nn

from finetune import make_private
from finetune.models.llama import LlamaConfig, LlamaForCausalLM
from helpers import apply_llama_method

N, T = 64, 12


def _data():
    """A learnable corpus: each row counts up from a random start (next token = id + 1)."""
    rs = np.random.RandomState(0)
    start = rs.randint(0, 40, N)
    ids = (start[:, None] + np.arange(T)[None, :]).astype(np.int32)
    return ids, np.ones((N, T), np.float32)


def _mean_loss(model, ids, mask):
    return float(model.loss(Tensor(ids), Tensor(mask)).asnumpy().mean())


@pytest.mark.slow     # > 20 s each on a shared 2-core machine
@pytest.mark.parametrize("method", ["lora", "norm_only", "houlsby", "full"])
def test_make_private_on_llama_tiny_uses_bookkeeping_and_learns(method):
    model = apply_llama_method(LlamaForCausalLM(LlamaConfig.preset("llama-tiny"), seed=0), method, r=4, size=8)
    ids, mask = _data()
    before = _mean_loss(model, ids, mask)
    # gains scale logits that start near zero: norm-only needs larger steps to move the loss
    lr = 0.1 if method == "norm_only" else 0.02
    engine = make_private(model, nn.Adam(model.trainable_params(), learning_rate=lr), dataset_size=N,
                          batch_size=16, steps=8, noise_multiplier=0.5, target_delta=1e-3,
                          micro_batch_size=16, verbose=False)
    assert engine.per_example_method == "bookkeeping", engine.per_example_reason
    for batch in engine.batches(ids, mask):
        engine.step(batch)
    after = _mean_loss(model, ids, mask)
    assert after < before - 0.01, (before, after)
