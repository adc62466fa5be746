"""bench/merge.py runs end to end at a tiny size (no mergekit needed) and checks its outputs."""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_merge_tiny(tmp_path):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "merge.py"), "--size-gb", "0.005", "--skip-mergekit",
                          "--workdir", str(tmp_path), "--clean"], capture_output=True, text=True, timeout=120,
                         check=False)
    elapsed = time.perf_counter() - t
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split()[:4] == ["case", "wall", "s", "work"]
    rows = {line.split("  ")[0].strip() for line in lines[header + 1:header + 5]}
    assert rows == {"cp", "ours 1w", "naive", "ours 5w"}
    assert "FAILED" not in out.stdout and out.stdout.count("[ok]") == 8
    assert "ours never imported torch: True" in out.stdout
    assert not any(tmp_path.iterdir())  # --clean removed the inputs
    assert elapsed < 20, f"took {elapsed:.1f}s"
