"""The benchmarks run (tiny shapes) and print their tables; bad options are refused by name.

Speed itself is measured by running the benchmarks, never asserted here: these only keep the
scripts from rotting (a renamed API, a broken option) between the runs that matter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses (~20 s together); CI runs them

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "src" / "hashrec" / "datasets" / "kuairand_sample"


def _run(*argv: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), full_env.get("PYTHONPATH", "")])
    return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _numbers(line: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", line)]


def test_bench_ranker_prints_every_path_and_the_training_step():
    r = _run(sys.executable, "benchmarks/bench_ranker.py", "--candidates", "16", "--repeats", "1",
             "--no-flex", "--history", "8", "--dim", "16", "--layers", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 16 |")]
    paths = [row.split("|")[2].strip() for row in rows]
    assert paths == ["fast (isolated, cap 30)", "full mask (cap 30)", "full mask SDPA (no cap)",
                     "dense floor (no attention)", "earlier floor (q only: no k/v backward)"]  # fmt: skip
    for row in rows:
        fwd_ms, fwd_bwd_ms = float(row.split("|")[3]), float(row.split("|")[5])
        assert fwd_ms > 0 and fwd_bwd_ms > fwd_ms * 0.5
    step = next(line for line in r.stdout.splitlines() if "Training step, whole ranker" in line)
    assert "candidate examples/s" in step and _numbers(step.split(":")[-1])[0] > 0


def test_bench_inference_times_each_weight_kind_and_the_ensemble():
    r = _run(sys.executable, "benchmarks/bench_inference.py", "--requests", "3", "--candidates",
             "20", "--history", "8", "--dim", "16", "--layers", "1", "--ensemble", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines()
            if line.startswith("| fp32") or line.startswith("| bf16")}  # fmt: skip
    assert set(rows) == {"fp32 weights", "bf16 weights", "fp32, ensemble of 2"}
    assert all(float(row.split("|")[2]) > 0 for row in rows.values())  # p50 ms
    assert "bf16 vs fp32 probabilities: max abs difference" in r.stdout


def test_profile_train_prints_every_phase_on_the_shipped_sample():
    r = _run(sys.executable, "benchmarks/profile_train.py", "--data", str(SAMPLE), "--steps",
             "2", "--warmup", "1", "--ops", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for phase in ("data", "lookup", "transformer + head", "backward", "step"):
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {phase} |"))
        assert float(row.split("|")[2]) >= 0
    assert "Top 5 operators" in r.stdout and "examples/s" in r.stdout


@pytest.mark.parametrize(
    "script",
    [
        "bench_inference.py",
        "bench_table.py",
        "bench_ranker.py",
        "profile_train.py",
        "bench_train_step.py",
    ],
)
def test_benchmarks_refuse_an_unknown_device(script):
    r = _run(sys.executable, f"benchmarks/{script}", "--device", "tpu")
    assert r.returncode == 2 and "device must be cpu or cuda[:N], got 'tpu'" in r.stderr


def test_device_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """``benchmarks/device_check.sh`` in its dry-run form: one step, its log, the summary; a
    failing step makes the script fail; unknown steps are refused."""
    env = {"DEVICE": "cpu", "REPEATS": "1", "ONLY": "inference", "OUT": str(tmp_path / "a"),
           "PYTHON": sys.executable,
           "INFERENCE_ARGS": "--candidates 20 --history 8 --dim 16 --layers 1"}  # fmt: skip
    r = _run("bash", "benchmarks/device_check.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^inference: exit 0 in \d+ s$", r.stdout, re.M), r.stdout[-2000:]
    log = (tmp_path / "a" / "inference.log").read_text()
    assert "| fp32 weights |" in log and "| fp32, ensemble of 3 |" in log
    assert not (tmp_path / "a" / "tests.log").exists()  # steps not asked for do not run
    r = _run("bash", "benchmarks/device_check.sh",
             env={**env, "OUT": str(tmp_path / "b"), "PYTHON": "false"})  # fmt: skip
    assert r.returncode == 1 and re.search(r"^inference: exit 1 in", r.stdout, re.M)
    r = _run("bash", "benchmarks/device_check.sh", env={**env, "ONLY": "test"})
    assert r.returncode == 2 and "ONLY: unknown step 'test'" in r.stderr


def test_bench_train_step_times_each_mode_on_the_shipped_sample():
    r = _run(sys.executable, "benchmarks/bench_train_step.py", "--steps", "2", "--warmup", "1",
             "--batch", "8", "--history", "8", "--modes", "packed,padded_full")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| 8 |")]
    assert [row[3].strip() for row in rows] == ["packed", "padded_full"]
    for row in rows:
        assert float(row[4]) > 0 and float(row[5].replace(",", "")) > 0  # ms/step, examples/s
    assert rows[0][6].strip() == "1.00x"
    bad = _run(sys.executable, "benchmarks/bench_train_step.py", "--modes", "packed,fast")
    assert bad.returncode == 2 and "unknown mode(s) ['fast']" in bad.stderr
    bad = _run(sys.executable, "benchmarks/bench_train_step.py", "--compile", "fast")
    assert bad.returncode == 2 and "unknown torch.compile mode(s) ['fast']" in bad.stderr
