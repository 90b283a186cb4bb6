"""Process set-up: thread counts reach Paddle and numpy's BLAS, commands run quietly, the installed
package works from any directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# numpy is imported first, as in any real program, and with 2 BLAS threads: the command's own
# set-up must still leave BLAS (and Paddle) at the requested count.
PROBE = textwrap.dedent("""
    import json, sys
    import numpy, threadpoolctl
    from paddle_caption.runtime import UserError
    from paddle_caption.entry_points import command_main
    main = command_main(sys.argv[1])
    try:
        main(sys.argv[2:])
    except UserError as err:
        print("user error:", err, file=sys.stderr)
    import paddle
    blas = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    print(json.dumps({"blas": blas}))
""")


def run_probe(tmp_path, command, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", PROBE, command, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_predict_num_threads_reaches_numpy_blas_and_paddle_stays_quiet(tmp_path):
    (tmp_path / "test.tsv").write_text("a\tb\n")
    threads, stderr = run_probe(tmp_path, "predict", "test.tsv", "out.txt", "no_model_here",
                                "--num_threads", "1")
    assert "model directory not found" in stderr  # set-up ran, then the missing model stopped it
    assert threads["blas"] and set(threads["blas"]) == {1}
    assert "OMP_NUM_THREADS" not in stderr and "WARNING" not in stderr


def test_train_config_num_threads_reaches_numpy_blas(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({
        "model_config": "config/model/tiny.json", "train_records": "missing.jsonl", "max_steps": 1,
        "num_threads": 1, "output_dir": "run"}))
    threads, stderr = run_probe(tmp_path, "train", "c.json")
    assert "missing.jsonl" in stderr
    assert set(threads["blas"]) == {1}
    assert "OMP_NUM_THREADS" not in stderr and "WARNING" not in stderr


def test_configure_sets_paddle_threads_at_run_time():
    code = ("from paddle_caption.runtime import configure\n"
            "import paddle\n"
            "configure(1); configure(2)\n"
            "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2"]


@pytest.mark.slow
def test_installed_wheel_trains_merges_and_predicts_from_another_directory(tmp_path):
    """pip install of the built wheel (not editable) into a fresh venv; every step from a directory
    that is not the repository, with the packaged prompts and model configs."""
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    vpy = venv / "bin" / "python"
    # Dependencies come from this environment's site-packages (appended after the venv's own, so the
    # wheel's paddle_caption wins; .pth files there, like the editable install's hook, are not run).
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "outer_deps.pth").write_text(deps + "\n")
    wheel = next(dist.glob("paddle_caption-*.whl"))
    # --ignore-installed: the outer environment's editable install (same version, visible through the
    # .pth above) would otherwise count as "already satisfied" and the wheel would not be installed.
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    bin_dir = venv / "bin"

    def run(script, *args):
        proc = subprocess.run([str(bin_dir / script), *map(str, args)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-2000:]}"
        assert "WARNING" not in proc.stderr, proc.stderr
        return proc

    where = subprocess.run([str(vpy), "-c", "import paddle_caption; print(paddle_caption.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(site), where  # the installed copy, not the repository
    run("paddle-caption-make-data", "data", "--train", 10, "--val", 2, "--test", 3, "--seed", 4, "--quiet")
    run("paddle-caption-convert", "data/train.tsv", "train", "--quiet")
    (work / "c.json").write_text(json.dumps({
        "model_config": "config/model/tiny.json", "train_records": "train/records.jsonl",
        "max_steps": 2, "output_dir": "run"}))
    run("paddle-caption-train", "c.json", "--progress", "false")
    run("paddle-caption-merge", "--model_name_or_path", "config/model/tiny.json", "--local_path", "run",
        "--merge_model_path", "model")
    run("paddle-caption-predict", "data/test.tsv", "results.txt", "model", "--max_new_tokens", 4, "--no_progress")
    lines = (work / "results.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"test_{i:06d}" for i in range(1, 4)]
    assert json.loads((work / "model" / "prompt.json").read_text())["system"] == "You are a helpful assistant."


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_limit_malloc_arenas_caps_glibc_arenas_unless_the_user_set_them(monkeypatch):
    from paddle_caption.runtime import M_ARENA_MAX, limit_malloc_arenas

    libc = _FakeLibc()
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas(2, libc=libc) is True
    assert libc.calls == [(M_ARENA_MAX, 2)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # glibc read the user's own value at start: keep it
    assert limit_malloc_arenas(2, libc=libc) is False
    assert libc.calls == [(M_ARENA_MAX, 2)]
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas(2, libc=object()) is False  # no mallopt (not glibc): a no-op


def test_serve_caps_malloc_arenas_before_parsing_its_arguments(monkeypatch):
    from paddle_caption.serve import cli

    called = []
    monkeypatch.setattr(cli, "limit_malloc_arenas", lambda: called.append(True))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert called == [True]
