"""training.deepspeed_engine: the ZeRO config's keys, and (DeepSpeed's CPU accelerator, gloo, 2 ranks in
subprocesses) ZeRO-2 and ZeRO-3 steps keep pruned weights, and their fp32 master copies, exactly 0.

Run as a script, this file is one rank of that run: `python test_deepspeed_engine.py STAGE DTYPE OUT`
with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_PORT set; it writes OUT/rank<r>.json.
"""
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raycompress.training.deepspeed_engine import INSTALL_HINT, ds_config

WORLD = 2


def test_ds_config_stage2_known_answer():
    assert ds_config(2, False, 4, 1e-4, 0.01, bf16=False) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def test_ds_config_offload_and_bf16():
    c2 = ds_config(2, True, 1, 3e-5, 0.0, bf16=True, grad_accum=8)
    assert c2["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert c2["bf16"] == {"enabled": True} and c2["fp16"] == {"enabled": False}
    assert c2["gradient_accumulation_steps"] == 8 and c2["train_micro_batch_size_per_gpu"] == 1
    assert ds_config(3, True, 1, 3e-5, 0.0, bf16=False)["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
        "stage3_gather_16bit_weights_on_model_save": True}
    assert ds_config(3, False, 1, 3e-5, 0.0, bf16=False)["zero_optimization"] == {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True}


@pytest.mark.parametrize("kw", [{"zero_stage": 1}, {"zero_stage": 0}, {"batch_size": 0}, {"grad_accum": 0}])
def test_ds_config_rejects(kw):
    args = {"zero_stage": 2, "offload": False, "batch_size": 2, "lr": 1e-4, "weight_decay": 0.0, "bf16": False,
            **kw}
    with pytest.raises(ValueError):
        ds_config(**args)


def test_make_engine_without_deepspeed_says_how_to_install(monkeypatch):
    from raycompress.training import deepspeed_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install '\.\[train\]'"):
        deepspeed_engine.make_engine(torch.nn.Linear(2, 2), ds_config(2, False, 1, 1e-3, 0.0, False))
    assert "train.strategy: deepspeed needs the [train] extra" in INSTALL_HINT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list, timeout: float) -> None:
    """Wait for every process; once one fails or time runs out, kill the rest (a rank left alone
    waits in a collective forever)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.5)
    for p in procs:
        p.wait()


@pytest.mark.parametrize("stage,dtype", [(2, "float32"), (3, "bfloat16")])
def test_zero_steps_keep_pruned_weights_zero(tmp_path, stage, dtype):
    pytest.importorskip("deepspeed", reason=INSTALL_HINT)
    port = _free_port()
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"rank{r}.log" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, str(stage), dtype, str(tmp_path)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=logs[r].open("w"), stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    # the first run JIT-compiles DeepSpeed's CPU ops (shm comm, Adam) into ~/.cache/torch_extensions
    _wait_all(procs, timeout=900)
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r].read_text()[-6000:]}"
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in res:
        assert r["master_masked_nonzero"] == 0  # fp32 master copies (all ranks' partitions gathered)
        assert r["live_masked_nonzero"] == 0  # the model's weights as the next forward sees them
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
        assert r["hook_shapes"] and all(s == r["hook_shapes"][0] for s in r["hook_shapes"])
    r0 = res[0]
    assert r0["n_linears"] == 14 and r0["dtype"] == dtype
    assert r0["masked"] == r0["total"] // 2  # 50% pruned
    assert r0["saved_masked_nonzero"] == 0  # the consolidated weights
    assert r0["kept_changed_frac"] > 0.9
    assert r0["reloaded_masked_nonzero"] == 0  # save_pretrained(state_dict=...) round trip
    if stage == 3:
        assert r0["partitioned"] > 0 and r0["persistent"] > 0  # both stage-3 paths of apply_mask ran


def _rank_main(stage: int, dtype: str, out: Path) -> None:
    """One rank: tiny Llama, 50% magnitude-pruned linears, 2 ZeRO steps, facts written as JSON."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import LlamaConfig, LlamaForCausalLM

    from raycompress.training.deepspeed_engine import deepspeed_step, full_state_dict, make_engine
    from raycompress.training.masks import WeightMask, target_linears

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    # as Ray Train's TorchTrainer does before the train function runs: a gloo group already up
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}")
    torch.manual_seed(0)  # same model on every rank
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for lin in target_linears(model).values():
            w = lin.weight
            w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values, 0)
    mask = WeightMask.from_zeros(model)
    # no mask.attach(): masked gradients stay nonzero, so only apply_mask keeps the weights at 0;
    # one plain hook records that tensor hooks do fire under ZeRO (with the whole gradient)
    hook_shapes: list = []
    next(iter(mask.linears.values())).weight.register_hook(lambda g: hook_shapes.append(list(g.shape)))
    before = {n: w.detach().clone() for n, w in mask.weights().items()}

    bf16 = dtype == "bfloat16"
    config = ds_config(stage, False, 2, 1e-2, 0.01, bf16=bf16)
    if stage == 3:  # partition the MLP weights (8192 elements), keep attention's (<= 4096) gathered
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 5000
    engine, _ = make_engine(model, config)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    losses = [deepspeed_step(engine, torch.randint(0, 256, (2, 16), generator=gen), mask) for _ in range(2)]

    masked_nonzero = 0
    for n, lin in mask.linears.items():  # a collective at stage 3: every rank, same order
        hp = safe_get_full_fp32_param(lin.weight)
        masked_nonzero += int((hp.reshape(mask.masks[n].shape)[mask.masks[n]] != 0).sum())
    ps = [lin.weight for lin in mask.linears.values()]
    # the weights the next forward would use (stage 3: gathered; persistent ones already are)
    with deepspeed.zero.GatheredParameters(ps, enabled=stage == 3):
        live = sum(int((lin.weight[mask.masks[n]] != 0).sum()) for n, lin in mask.linears.items())
    facts = {"losses": losses, "master_masked_nonzero": masked_nonzero, "live_masked_nonzero": live,
             "hook_shapes": hook_shapes,
             "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in ps),
             "partitioned": sum(hasattr(p, "ds_id") and not p.ds_persist for p in ps)}
    state = full_state_dict(engine, dtype=torch.bfloat16 if bf16 else torch.float32)
    if rank == 0:
        saved = {n: state[n + ".weight"] for n in mask.linears}
        facts.update(n_linears=len(saved), dtype=str(saved[next(iter(saved))].dtype).removeprefix("torch."),
                     masked=mask.counts()[0], total=mask.counts()[1],
                     saved_masked_nonzero=sum(int((w[mask.masks[n]] != 0).sum()) for n, w in saved.items()))
        kept = [(saved[n].float() != before[n].float())[~mask.masks[n]] for n in saved]
        facts["kept_changed_frac"] = float(torch.cat(kept).float().mean())
        LlamaForCausalLM(cfg).save_pretrained(out / "model", state_dict=state)
        back = LlamaForCausalLM.from_pretrained(out / "model", dtype="auto")
        facts["reloaded_masked_nonzero"] = sum(int((lin.weight[mask.masks[n]] != 0).sum())
                                               for n, lin in target_linears(back).items())
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    print(json.dumps(facts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
