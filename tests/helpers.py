"""Small networks several test files share (imported as ``helpers``: pytest puts tests/ on the path)."""
from mindspore import nn, ops


class Clf(nn.Cell):
    """Linear classifier with a deterministic (zero) start; per-example cross-entropy [B]."""

    def __init__(self, features: int = 4, classes: int = 3):
        super().__init__()
        self.fc = nn.Dense(features, classes, weight_init="zeros", bias_init="zeros")

    def construct(self, x, y):
        return ops.cross_entropy(self.fc(x), y, reduction="none")
