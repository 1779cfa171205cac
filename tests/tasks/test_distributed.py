"""Distributed training with real processes (gloo on CPU): exact contrastive losses,
rank-correct streaming that cannot hang, DDP/FSDP runs, multirun and multi-node launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from polymodal.data.datamodule import WebDataModule
from polymodal.data.stream import source_of_batch
from polymodal.objectives.base import EncodingCache
from polymodal.objectives.itc import ITCObjective
from polymodal.objectives.siglip import SigLIPObjective
from polymodal.utils.distributed import gather_objects, gather_variable, neighbour_exchange
from tests.helpers import (
    free_port,
    init_gloo,
    random_batch,
    run_ranks,
    tiny_model,
    write_uneven_shards,
)

PER_RANK = 4
OBJECTIVES = {"itc": ITCObjective, "siglip": SigLIPObjective}


def _loss_worker(
    rank, world, port, name, kwargs, expect_exact_grads, per_rank=PER_RANK, micro_batch=None
):
    """Loss and DDP-averaged gradients of each rank's share (encoded in micro-batches of
    `micro_batch`) == one process, whole batch at once."""
    torch.manual_seed(0)
    objective = OBJECTIVES[name](**kwargs)
    model = tiny_model(parts=objective.parts, conv_stem=False)
    params = dict(model.named_parameters())
    batch = random_batch(world * per_rank)
    reference = objective(EncodingCache(model, batch)).loss  # before any process group
    reference.backward()
    expected = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    init_gloo(rank, world, port)
    model.micro_batch_size = micro_batch
    share = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    loss = objective(EncodingCache(model, share)).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, reference.detach(), atol=1e-5, rtol=0)
    assert expected.keys() == {n for n, p in params.items() if p.grad is not None}
    mismatched = []
    for name_, param in params.items():
        if param.grad is None:
            continue
        grad = param.grad.clone()
        dist.all_reduce(grad)  # DDP's gradient average
        # rtol: SigLIP's image gradients reach ~150 at 256 pairs, where fp32 steps by 1.5e-5
        if not torch.allclose(grad / world, expected[name_], atol=1e-5, rtol=1e-6):
            mismatched.append(name_)
    if expect_exact_grads:
        assert not mismatched, f"gradients differ from one process: {mismatched}"
    else:
        assert mismatched, "the no-grad gather should miss the other ranks' loss terms"


@pytest.mark.parametrize(
    "name,kwargs,exact",
    [
        ("itc", {"local_loss": True, "gather_with_grad": True}, True),
        ("itc", {"local_loss": False, "gather_with_grad": True}, True),
        ("itc", {"local_loss": True, "gather_with_grad": False}, False),
        ("siglip", {}, True),
    ],
)
def test_distributed_contrastive_loss_equals_one_process(name, kwargs, exact):
    run_ranks(_loss_worker, 2, name, kwargs, exact)


@pytest.mark.parametrize("name", ["itc", "siglip"])
def test_micro_batches_on_two_ranks_equal_one_process(name):
    """2 ranks x 4 micro-batches of 32: the loss and gradients of one batch of 256."""
    kwargs = {"local_loss": True, "gather_with_grad": True} if name == "itc" else {}
    run_ranks(_loss_worker, 2, name, kwargs, True, 128, 32)


def _collectives_worker(rank, world, port):
    init_gloo(rank, world, port)
    rows = torch.full((rank + 1, 2), float(rank))  # rank r holds r + 1 rows
    assert gather_variable(rows).tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert gather_objects([f"r{rank}"] * (rank + 1)) == ["r0", "r1", "r1"]
    x = torch.tensor([float(rank)], requires_grad=True)
    received = neighbour_exchange(x * 10)
    assert received.item() == 10.0 * ((rank - 1) % world)
    (received * (rank + 1)).sum().backward()  # rank r's x is read by rank r + 1
    assert x.grad.item() == 10.0 * (((rank + 1) % world) + 1)


def test_gathers_and_neighbour_exchange():
    run_ranks(_collectives_worker, 2)


def _stream_worker(rank, world, port, shard_dir, tokenizer, out_dir, start_method):
    init_gloo(rank, world, port)
    data = WebDataModule(
        train_shards=f"{shard_dir}/*.tar",
        val_shards=None,
        tokenizer=tokenizer,
        batch_size=16,
        num_workers=2,
        worker_start_method=start_method,
        seed=0,  # the config seed: the same on every rank
    )
    data.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    data.setup()
    keys, steps = [], 0
    for batch in data.train_dataloader():
        keys += batch["key"]
        steps += 1
        dist.all_reduce(torch.ones(1))  # a collective every step, as DDP has: hangs if uneven
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"keys": keys, "steps": steps}))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_two_ranks_two_workers_read_disjoint_samples_in_step(shapes_dir, tmp_path, start_method):
    """Uneven shards, 2 ranks x 2 loader workers (fork or spawn): every training sample
    of the epoch exactly once, disjoint per rank, the same number of steps on both."""
    write_uneven_shards(
        shapes_dir / "train", tmp_path / "shards", [37, 101, 64, 9, 50, 120, 3, 128]
    )
    tokenizer = str(shapes_dir / "tokenizer.json")
    run_ranks(_stream_worker, 2, str(tmp_path / "shards"), tokenizer, str(tmp_path), start_method)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [16, 16]
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    every = ranks[0]["keys"] + ranks[1]["keys"]
    assert len(every) == len(set(every)) == 512


def run_train(*args: str, cwd: Path, timeout: int = 400, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polymodal.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def small_run(shapes_dir: Path) -> list[str]:
    return [
        f"paths.shapes_dir={shapes_dir}",
        "data.prepare=null",
        "data.batch_size=16",
        "data.val_batch_size=32",
        "data.num_workers=0",
    ]


# DDP inside a multirun (`-m trainer=ddp_sim`): the README's command, with its checks
# (tests/test_readme.py, expect_synced_sweep_points)


def test_two_nodes_under_torchrun_agree_on_weights(tmp_path, shapes_dir):
    """`torchrun --nnodes 2 --nproc-per-node 1` on localhost: a DDP run over 2 "nodes"."""
    port = free_port()
    commands = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "polymodal.train",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.num_nodes=2",
            "trainer.precision=32-true",
            "+trainer.strategy.process_group_backend=gloo",
            "trainer.max_steps=4",
            "logger=csv",
            "~callbacks",
            *small_run(shapes_dir),
            f"hydra.run.dir={tmp_path / f'node{node}'}",
        ]
        for node in range(2)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in commands
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    metrics = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert metrics["train/global_step"] == 4
    assert metrics["dist/ranks_in_sync"] == 1.0


def test_fsdp_fast_run_on_two_cpu_processes(tmp_path, shapes_dir):
    out = run_train(
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "+trainer.strategy.process_group_backend=gloo",
        "debug=fdr",
        *small_run(shapes_dir),
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train/global_step"] == 1 and "val/zeroshot/mean_acc" in metrics


@pytest.mark.slow  # ~1-2 min: two spawned ranks
def test_mixed_sources_train_under_ddp(tmp_path, shapes_dir, sounds_dir):
    """trimodal on 2 gloo ranks: steps of one source leave the other modality's stem
    unused, which static-graph DDP refuses; the run ends with identical weights."""
    out = run_train(
        "experiment=trimodal",
        "trainer=ddp_sim",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "+trainer.limit_val_batches=1",
        "logger=csv",
        "~callbacks",
        *small_run(shapes_dir),
        f"paths.sounds_dir={sounds_dir}",
        f"data.tokenizer={shapes_dir / 'tokenizer.json'}",
        "model.towers.audio.depth=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train/global_step"] == 6 and metrics["dist/ranks_in_sync"] == 1.0
    assert "val/shapes/zeroshot/mean_acc" in metrics and "val/sounds/zeroshot/mean_acc" in metrics
    cfg = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    weights = {name: spec.weight for name, spec in cfg.data.sources.items()}
    drawn = {source_of_batch(cfg.seed, 0, 0, n, weights) for n in range(1, 7)}
    assert drawn == {"shapes", "sounds"}  # both sources trained: the unused-stem case ran
