"""Small networks several test files share (imported as ``helpers``: pytest puts tests/ on the path)."""
from mindspore import nn, ops


class Clf(nn.Cell):
    """Linear classifier with a deterministic (zero) start; per-example cross-entropy [B]."""

    def __init__(self, features: int = 4, classes: int = 3):
        super().__init__()
        self.fc = nn.Dense(features, classes, weight_init="zeros", bias_init="zeros")

    def construct(self, x, y):
        return ops.cross_entropy(self.fc(x), y, reduction="none")


def certified_table(path, noise, geometry="l2", q=0.1, steps=8, delta=1e-5):
    """A table for ``noise`` whose target is its own certified epsilon (the table is always valid)."""
    from accountant.certify import certify
    from accountant.mechanism import Mechanism
    from accountant.table import write_certified_table

    cert = certify(Mechanism(noise, 1.0, geometry, q, steps), delta)
    return write_certified_table(path, noise, eps_target=cert.epsilon, delta=delta, sampling_rate=q,
                                 steps=steps, geometry=geometry, certificate=cert,
                                 gaussian_sigma=noise.params.get("sigma", 1.0))


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_llama_method(model, method: str, r: int, size: int):
    """``method`` ("lora" on all seven projections, "norm_only", "houlsby" adapters, "full": nothing)
    applied to a Llama-family model; returns the model."""
    from finetune.models import peft

    if method == "lora":
        peft.apply_lora(model, r=r, targets=LLAMA_PROJECTIONS)
    elif method == "norm_only":
        peft.apply_norm_only(model)
    elif method == "houlsby":
        peft.apply_adapters(model, size=size)
    return model
