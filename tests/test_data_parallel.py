"""Data parallel on CPU (gloo), launched as a user would: `python -m paddle.distributed.launch`.

- 2 ranks x batch 4 end with the weights of 1 process x batch 4 x accumulation 2 on the same data
  order (rank r takes batches r::2 of the epoch; the 1-process run's step k accumulates batches
  2k and 2k+1: the same groups);
- no gradient all-reduce on accumulation micro-steps, one on the last;
- a wall-clock-bounded run stops at one step on every rank and the replicas end identical;
- a launched job killed with SIGKILL (launcher and workers) and relaunched ends with the weights of
  an uninterrupted one, and leaves no process behind;
- rank 0 alone writes files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import micro_model_json
from .test_train import ROOT, base_config, train, write_config

pytestmark = pytest.mark.slow
PY = sys.executable
STEPS = 6  # 40 synthetic rows -> 5 steps an epoch at 2 x 4: the run crosses an epoch boundary


def launch_command(log_dir: Path, *args) -> list[str]:
    return [PY, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
            *map(str, args)]


def run_launched(tmp_path: Path, name: str, *args, timeout: float = 240) -> Path:
    log_dir = tmp_path / f"{name}-logs"
    done = subprocess.run(launch_command(log_dir, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())
    worker_logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(log_dir.glob("workerlog.*")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + worker_logs
    return log_dir


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def dp_config(tmp_path, caption_data, name: str, **overrides) -> Path:
    values = dict(per_device_train_batch_size=4, max_steps=STEPS, output_dir=str(tmp_path / name),
                  logging_steps=1)
    cfg = base_config(tmp_path, caption_data, **{**values, **overrides})
    return write_config(tmp_path / f"{name}.json", **cfg)


def final_params(run_dir: Path) -> dict:
    from paddle_caption.model.weights_io import load_safetensors

    return {k: v.numpy() for k, v in load_safetensors(run_dir / "final/local_params.safetensors").items()}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, caption_data):
    """An uninterrupted 2-rank run (checkpoints every 2 steps), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("dp")
    config = dp_config(tmp_path, caption_data, "dp", save_steps=2, save_total_limit=1)
    logs = run_launched(tmp_path, "dp", "supervised_finetune.py", config)
    return {"tmp": tmp_path, "dir": tmp_path / "dp", "logs": logs}


def test_two_ranks_match_one_process_with_accumulation(dp_run, caption_data):
    tmp_path = dp_run["tmp"]
    cfg = json.loads((tmp_path / "dp.json").read_text())
    cfg.update(gradient_accumulation_steps=2, output_dir=str(tmp_path / "single"), save_steps=0)
    train(cfg)
    dp, single = final_params(dp_run["dir"]), final_params(tmp_path / "single")
    assert dp.keys() == single.keys() and any(k.startswith("visual.") for k in dp)
    for name in dp:
        np.testing.assert_allclose(dp[name], single[name], rtol=0, atol=1e-5, err_msg=name)
    # the runs really trained (the comparison is not between two untouched models)
    from paddle_caption.train.model_init import initial_model

    initial = dict(initial_model(None, cfg["model_config"], 0)[0].named_parameters())
    assert max(float(np.abs(dp[n] - initial[n].numpy()).max()) for n in dp) > 1e-3
    # logged losses are the mean over both ranks' micro-batches: the same numbers as one process
    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    np.testing.assert_allclose(losses(dp_run["dir"]), losses(tmp_path / "single"), rtol=1e-5)


def test_rank_zero_alone_writes(dp_run):
    run = dp_run["dir"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000004", "final", "log.jsonl",
                                                     "train_config.json", "train_summary.json"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one writer: no line twice
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["samples"] == STEPS * 2 * 4
    rank1 = (dp_run["logs"] / "workerlog.1").read_text()
    assert "done:" not in rank1 and "training full" not in rank1  # rank 1 is silent


def test_no_gradient_all_reduce_on_accumulation_micro_steps(tmp_path):
    model_json = micro_model_json(tmp_path)
    logs = run_launched(tmp_path, "probe", ROOT / "tests/launched/grad_sync_probe.py", model_json, timeout=120)
    assert '"grad_sync_probe": "passed"' in (logs / "workerlog.0").read_text()


def test_wall_clock_budget_stops_every_rank_at_one_step(tmp_path, caption_data):
    # 0.1 min: a few steps; the learning rate follows the clock, so a rank using its own clock would
    # apply other updates and the end-of-run replica check would fail the job
    config = dp_config(tmp_path, caption_data, "timed", max_steps=-1, num_train_epochs=1000,
                       max_train_minutes=0.1)
    logs = run_launched(tmp_path, "timed", "supervised_finetune.py", config)
    summary = json.loads((tmp_path / "timed/train_summary.json").read_text())
    assert summary["stop_reason"] == "time budget" and summary["steps"] > 1
    assert "diverged" not in (logs / "workerlog.1").read_text()


# ------------------------------------------------------------------------------- kill and resume
def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the launcher starts each worker in its own session)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the launcher and every worker at once, as a machine failure would; returns the pids."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return pids


def test_kill_and_resume_under_data_parallel_matches_uninterrupted_run(dp_run, caption_data):
    tmp_path = dp_run["tmp"]
    cfg = json.loads((tmp_path / "dp.json").read_text())
    cfg["output_dir"] = str(tmp_path / "killed")
    config = write_config(tmp_path / "killed.json", **cfg)
    run = tmp_path / "killed"
    proc = subprocess.Popen(launch_command(tmp_path / "killed-logs", "supervised_finetune.py", config), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    pids = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoint-000002").is_dir():
            time.sleep(0.01)
        workers = descendants(proc.pid)
        pids = kill_job(proc)
        assert len(workers) >= 2, "the launcher had not started its workers"
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert not (run / "final").exists()
    finally:
        if proc.poll() is None:
            pids = kill_job(proc)
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "processes of the killed job survived"

    run_launched(tmp_path, "resumed", "supervised_finetune.py", config, "--resume")
    assert "resumed from" in (tmp_path / "resumed-logs/workerlog.0").read_text()
    reference, resumed = final_params(dp_run["dir"]), final_params(run)
    for name in reference:
        np.testing.assert_array_equal(reference[name], resumed[name], err_msg=name)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------- optimizer-state sharding
def test_stage1_sharding_matches_data_parallel_and_resumes(dp_run, caption_data):
    from paddle_caption.model.weights_io import load_safetensors

    tmp_path = dp_run["tmp"]
    cfg = json.loads((tmp_path / "dp.json").read_text())
    cfg.update(sharding="stage1", output_dir=str(tmp_path / "stage1"))
    config = write_config(tmp_path / "stage1.json", **cfg)
    run_launched(tmp_path, "stage1", "supervised_finetune.py", config)
    run = tmp_path / "stage1"
    reference, sharded = final_params(dp_run["dir"]), final_params(run)
    for name in reference:
        np.testing.assert_allclose(sharded[name], reference[name], rtol=0, atol=1e-5, err_msg=name)
    # each rank saved the moments of its own share of the parameters, together all of them, once
    shards = [set(load_safetensors(run / "final" / f"optimizer.rank{r}-of-2.safetensors")) for r in range(2)]
    assert not (run / "final/optimizer.safetensors").exists()
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    owners = {key.split("::")[0] for key in shards[0] | shards[1]}
    assert owners == set(reference)
    # resume from the step-4 checkpoint: the same final weights
    first = sharded
    import shutil

    shutil.rmtree(run / "final")
    run_launched(tmp_path, "stage1-resumed", "supervised_finetune.py", config, "--resume")
    assert "resumed from" in (tmp_path / "stage1-resumed-logs/workerlog.0").read_text()
    again = final_params(run)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
