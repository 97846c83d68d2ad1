"""distributed.restarts: a dead actor is worth a restart; an error its own code raised is not."""
import os
import sys

import pytest
import ray

from raycompress.distributed.evaluate import run_pool
from raycompress.distributed.restarts import RestartBudget, StageFailed


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


class BadWeights(ValueError):
    pass


@ray.remote(num_cpus=0.1)
class Worker:
    def __init__(self, fail_init: bool = False) -> None:
        if fail_init:
            raise BadWeights("model-00002-of-00003.safetensors: model.layers.1.mlp.up_proj.weight: 3 NaN")

    def work(self, x: int, die: bool = False, fail: bool = False) -> int:
        if die:
            os._exit(1)
        if fail:
            raise OSError(28, "no space left writing /out/model-00001-of-00003.safetensors")
        return x * 2


def _absorb(budget, ref):
    try:
        ray.get(ref)
    except ray.exceptions.RayError as exc:
        budget.absorb(exc, "unit 0")
        return "restart"
    return "ok"


def test_a_dead_actor_is_restarted_until_the_budget_is_spent(ray_local):
    budget = RestartBudget("compress", 1)
    assert _absorb(budget, Worker.remote().work.remote(1, die=True)) == "restart" and budget.used == 1
    with pytest.raises(ray.exceptions.RayActorError):
        _absorb(budget, Worker.remote().work.remote(1, die=True))


def test_a_constructor_error_is_not_retried_and_reads_cleanly(ray_local):
    budget = RestartBudget("compress", 3)
    with pytest.raises(StageFailed) as err:
        _absorb(budget, Worker.remote(fail_init=True).work.remote(1))
    assert budget.used == 0 and err.value.remote_type == "BadWeights"
    assert str(err.value) == ("compress unit 0: BadWeights: model-00002-of-00003.safetensors: "
                              "model.layers.1.mlp.up_proj.weight: 3 NaN")


def test_a_method_error_is_not_retried(ray_local):
    budget = RestartBudget("compress", 3)
    with pytest.raises(StageFailed, match=r"^compress unit 0: OSError: \[Errno 28\] no space left writing /out/") as err:
        _absorb(budget, Worker.remote().work.remote(1, fail=True))
    assert budget.used == 0 and "Traceback" not in str(err.value)


def test_eval_pool_stops_at_once_when_actors_cannot_start(ray_local):
    spawned = []

    def spawn(slot, generation):
        spawned.append((slot, generation))
        return Worker.remote(fail_init=True)

    with pytest.raises(StageFailed, match="evaluate eval-0 unit 0: BadWeights"):
        run_pool(spawn, [[1], [2]], 1, lambda a, k, unit: a.work.remote(unit[0]), max_restarts=3)
    assert spawned == [(0, 0)]
