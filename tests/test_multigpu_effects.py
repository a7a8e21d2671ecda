"""Multi-process training on the CPU (gloo), end to end, through ``tests/multigpu_probe.py``: what each rank reads,
trains, saves and draws; SLURM's environment and its pre-emption signal. The fast tests at the top run by default."""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.cli.train import latest_checkpoint, resolve_resume
from ldm.config import load_config
from ldm.training.logs import logged

ROOT = Path(__file__).resolve().parents[1]
PROBE = [sys.executable, str(ROOT / "tests" / "multigpu_probe.py")]
TINY = ["--config", "configs/tiny/txt2img.yaml", "trainer.accelerator=cpu", "train.caption_dropout=0"]


def slurm_env(rank: int, ntasks: int, per_node: int, port: int) -> dict[str, str]:
    """The variables srun gives task ``rank`` of ``ntasks`` (``per_node`` a node) of job 4242."""
    nodes = ntasks // per_node
    return {"SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(rank // per_node), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ldm",
            "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PROBE_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def probe(out: Path, run_dir: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([*PROBE, str(out), *TINY, "--run-dir", str(run_dir), *args], cwd=ROOT, text=True,
                       capture_output=True, env=env or base_env(), timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def record(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_position(path: Path) -> tuple[int, int]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return int(ck["global_step"]), int(ck["batches_seen"])


# -- fast ---------------------------------------------------------------------------------------------------------
def test_resume_auto_takes_the_furthest_of_last_and_the_preemption_checkpoints(tmp_path):
    """Lightning's SLURM handler writes ``<run dir>/hpc_ckpt_<N>.ckpt`` when the job is pre-empted, after the last
    periodic ``last.ckpt``; ``--resume auto`` took last.ckpt whenever there was one, so every requeue lost the steps
    since it (up to train.checkpoint.every_n_steps). It takes the furthest trained of them (their ``global_step``)."""
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None and resolve_resume("auto", tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    hpc1, hpc2 = tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    for step, path in [(10, hpc1), (20, last), (25, hpc2)]:
        torch.save({"global_step": step, "batches_seen": step}, path)
    assert resolve_resume("auto", tmp_path) == str(hpc2)
    torch.save({"global_step": 30, "batches_seen": 30}, last)  # a periodic checkpoint after the requeued job resumed
    assert resolve_resume("auto", tmp_path) == str(last)


def test_slurm_runs_use_the_deferred_requeue_handler(tmp_path, monkeypatch):
    """Under SLURM, Lightning's own requeue handler (which saves inside the signal handler) is off and
    :class:`SlurmRequeue` takes the signal; outside SLURM neither is there."""
    from ldm.training.preemption import SlurmRequeue
    from ldm.training.trainer import build_trainer

    cfg = load_config("configs/tiny/txt2img.yaml", ["trainer.accelerator=cpu"])
    plain = build_trainer(cfg, tmp_path / "plain")
    assert not any(isinstance(cb, SlurmRequeue) for cb in plain.callbacks)
    for k, v in slurm_env(0, 1, 1, free_port()).items():
        monkeypatch.setenv(k, v)
    trainer = build_trainer(cfg, tmp_path / "slurm")
    env = trainer._accelerator_connector.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
    assert sum(isinstance(cb, SlurmRequeue) for cb in trainer.callbacks) == 1


def test_sbatch_output_needs_no_missing_folder():
    """SLURM does not create the folder of ``#SBATCH --output``; ``runs/`` is not in a fresh clone (.gitignore),
    so ``sbatch scripts/slurm_train.sbatch …`` from one failed at once, writing no log anywhere."""
    text = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    outputs = re.findall(r"^#SBATCH\s+--(?:output|error)=(\S+)", text, flags=re.M)
    assert outputs and all(Path(o).parent == Path(".") for o in outputs), outputs
    assert "--signal=SIGUSR1@" in text and "--resume auto" in text


# -- slow: several processes --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_read_disjoint_data_and_train_the_weights_of_one_process_with_both_batches(tmp_path):
    """2 DDP ranks × batch 4 against one process reading, at every step, both ranks' batches (8 samples), with each
    sample's noise and timestep fixed by its key: the same weights within fp32 rounding. Also: the ranks never read
    the same sample in an epoch, the EMA is the same on both, and only rank 0 writes checkpoints and draws grids."""
    env = base_env(PROBE_KEYED_NOISE="1")
    common = ["trainer.max_steps=4", "train.checkpoint.every_n_steps=2"]
    probe(tmp_path / "ddp", tmp_path / "ddp_run", *common, "trainer.devices=2", "trainer.strategy=ddp",
          "sample.every_n_steps=2", "sample.prompts=[a]", "sample.steps=2", env=env)
    probe(tmp_path / "one", tmp_path / "one_run", *common, env={**env, "PROBE_MERGE_RANKS": "2"})
    r0, r1, one = record(tmp_path / "ddp", 0), record(tmp_path / "ddp", 1), record(tmp_path / "one", 0)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2) and r0["global_step"] == 4
    seen0, seen1 = [k for b in r0["keys"] for k in b], [k for b in r1["keys"] for k in b]
    assert len(set(seen0)) == len(seen0) == 16 and not set(seen0) & set(seen1)
    assert [a + b for a, b in zip(r0["keys"], r1["keys"], strict=True)] == one["keys"]
    assert r0["ema"] == r1["ema"] and r0["weights"] == r1["weights"]
    w_ddp, w_one = torch.load(tmp_path / "ddp" / "weights0.pt"), torch.load(tmp_path / "one" / "weights0.pt")
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-5, atol=1e-6)
    assert r1["saved"] == [] and r1["grids"] == [] and r0["grids"] == [2, 4]
    logged_loss = {step: float(v) for step, v in logged(tmp_path / "ddp_run", "train/loss").items()}
    assert sorted(logged_loss) == [0, 1, 2, 3] and r0["losses"] != r1["losses"]
    for step, value in logged_loss.items():  # the global batch's loss, not rank 0's alone
        assert value == pytest.approx((r0["losses"][step] + r1["losses"][step]) / 2, rel=1e-5)
    assert sorted(Path(p).name for p in r0["saved"]) == ["last.ckpt", "last.ckpt", "step00000002.ckpt",
                                                        "step00000004.ckpt"]


def slurm_ranks(tmp_path: Path, ntasks: int, per_node: int, *args: str,
                extra: dict[int, dict[str, str]] | None = None) -> list[dict]:
    """Start ``ntasks`` processes as srun would (scripts/slurm_train.sbatch's overrides), wait, return the
    records."""
    port, out, procs = free_port(), tmp_path / "out", []
    for rank in range(ntasks):
        env = base_env(**slurm_env(rank, ntasks, per_node, port), **(extra or {}).get(rank, {}))
        cmd = [*PROBE, str(out), *TINY, "--run-dir", str(tmp_path / "run"), "trainer.strategy=ddp",
               f"trainer.devices={env['SLURM_NTASKS_PER_NODE']}", f"trainer.num_nodes={env['SLURM_JOB_NUM_NODES']}",
               "train.dist_timeout_s=60", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [record(out, r) for r in range(ntasks)]


@pytest.mark.slow
@pytest.mark.parametrize("per_node", [2, 1], ids=["one-node", "two-nodes"])
def test_slurm_tasks_become_the_ranks_and_a_signal_on_one_rank_saves_once_after_a_step(tmp_path, per_node):
    """SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID give each task its ranks. SIGUSR1 reaching one rank only, in
    the middle of step 1, makes every rank save the pre-emption checkpoint together after that step (Lightning's
    handler saved on that rank alone, inside the step: its checkpoint barrier met the other rank's all-reduce)."""
    recs = slurm_ranks(tmp_path, 2, per_node, "trainer.max_steps=3",
                       extra={1: {"PROBE_SIGUSR1_AT_STEP": "1"}})
    assert [(r["rank"], r["world_size"]) for r in recs] == [(0, 2), (1, 2)]
    assert [(r["node_rank"], r["local_rank"]) for r in recs] == ([(0, 0), (0, 1)] if per_node == 2
                                                                  else [(0, 0), (1, 0)])
    assert not set(recs[0]["keys"][0]) & set(recs[1]["keys"][0])
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert checkpoint_position(hpc) == (2, 2) and not (tmp_path / "run" / "hpc_ckpt_2.ckpt").exists()
    assert [Path(p).name for p in recs[0]["saved"]].count("hpc_ckpt_1.ckpt") == 1 and recs[1]["saved"] == []


def fake_scontrol(bin_dir: Path) -> None:
    """An ``scontrol`` that ends the job the way ``scontrol requeue`` does: it kills the calling process."""
    bin_dir.mkdir()
    path = bin_dir / "scontrol"
    path.write_text("#!/bin/sh\necho \"scontrol $*\" >> \"$(dirname \"$0\")/calls\"\nkill -9 $PPID\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_a_preempted_slurm_job_resumes_after_the_step_it_was_warned_in(tmp_path):
    """SIGUSR1 during step 2's backward (checkpoints every 2 steps): the job saves the state after step 2 and is
    requeued (killed); the requeued job (--resume auto) continues from that checkpoint, not from last.ckpt, and
    ends with the weights of a run never interrupted. Lightning's handler saved the state in the middle of step 2
    (data position one batch ahead of the weights) and --resume auto took last.ckpt."""
    bin_dir = tmp_path / "bin"
    fake_scontrol(bin_dir)
    env = base_env(**slurm_env(0, 1, 1, free_port()), PATH=f"{bin_dir}:{os.environ['PATH']}")
    steps = ["trainer.max_steps=5", "train.checkpoint.every_n_steps=2"]
    run_dir = tmp_path / "run"
    cmd = [*PROBE, str(tmp_path / "first"), *TINY, "--run-dir", str(run_dir), "--resume", "auto", *steps]
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "PROBE_SIGUSR1_AT_STEP": "2"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]  # killed by the requeue
    assert (bin_dir / "calls").read_text().split() == ["scontrol", "requeue", "4242"]
    assert checkpoint_position(run_dir / "hpc_ckpt_1.ckpt") == (3, 3)
    probe(tmp_path / "second", run_dir, "--resume", "auto", *steps, env=env)
    assert len(record(tmp_path / "second", 0)["keys"]) == 2  # steps 3 and 4
    probe(tmp_path / "whole", tmp_path / "whole_run", *steps)
    resumed, whole = torch.load(tmp_path / "second" / "weights0.pt"), torch.load(tmp_path / "whole" / "weights0.pt")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0)


def test_use_distributed_sampler_is_refused_naming_the_key(tmp_path):
    """The loader splits the data across ranks itself; Lightning's sampler never applied, so the key did nothing."""
    from ldm.registry import ConfigError
    from ldm.training.trainer import build_trainer

    cfg = load_config("configs/tiny/txt2img.yaml", ["trainer.accelerator=cpu", "trainer.use_distributed_sampler=false"])
    with pytest.raises(ConfigError, match="trainer.use_distributed_sampler is not supported"):
        build_trainer(cfg, tmp_path)


def test_resuming_with_another_world_size_warns_that_the_data_does_not_continue(caplog):
    """The data position is counted in batches per rank: a checkpoint of a 2-rank run resumed on 1 rank (or with
    another batch size) re-deals the epochs, silently before."""
    from types import SimpleNamespace

    from ldm.training.guard import StepGuard
    from ldm.training.stage import ResumableStage

    cfg = load_config("configs/tiny/txt2img.yaml", [])

    class Stage(ResumableStage):
        def __init__(self, world: int) -> None:
            self.config, self.guard, self.batches_seen = cfg, StepGuard(), 0
            self._trainer = self.trainer = SimpleNamespace(world_size=world, loggers=[])

    saved: dict = {}
    Stage(2).on_save_checkpoint(saved)
    with caplog.at_level("WARNING", logger="ldm.training.stage"):
        Stage(2).on_load_checkpoint(dict(saved))
        assert not caplog.records
        Stage(1).on_load_checkpoint(dict(saved))
    assert "world_size=2" in caplog.text and "this run has world_size=1" in caplog.text
