"""config.TrainConfig: the optional train stage's schema (strategy, ZeRO, GMP schedule within the budget)."""
import pytest
from pydantic import ValidationError

from raycompress.config import TrainConfig


def test_defaults_and_gmp():
    cfg = TrainConfig(steps=100, gmp={"final_sparsity": 0.5, "n_prunes": 4, "interval": 10})
    assert cfg.strategy == "ddp" and cfg.zero_stage == 2 and not cfg.offload
    assert cfg.gmp.initial_sparsity is None and cfg.gmp.scope == "global"
    TrainConfig(steps=10, strategy="deepspeed", zero_stage=3, offload=True)


@pytest.mark.parametrize("bad, match", [
    (dict(steps=10, offload=True), "deepspeed"),
    (dict(steps=40, gmp={"final_sparsity": 0.5, "n_prunes": 4, "interval": 10}), "outside train.steps"),
    (dict(steps=10, gmp={"final_sparsity": 0.5, "initial_sparsity": 0.6}), "only increases"),
    (dict(steps=10, gmp={"final_sparsity": 1.0}), "final_sparsity"),
    (dict(steps=10, zero_stage=1), "zero_stage"),
    (dict(steps="10"), "steps"),  # strict: a quoted number is not a number
    (dict(steps=10, strategy="fsdp"), "strategy"),
    (dict(steps=10, lr=0.0), "lr"),
    (dict(steps=10, typo=1), "typo"),
    (dict(steps=100, strategy="deepspeed", zero_stage=3, gmp={"final_sparsity": 0.5, "n_prunes": 2}), "zero_stage: 3"),
])
def test_rejects(bad, match):
    with pytest.raises(ValidationError, match=match):
        TrainConfig(**bad)
