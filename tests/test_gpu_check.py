"""The GPU check's wiring, run on the CPU with tiny models (`bench/gpu_check.py --dry-run`): every part
runs and reports, so that the few minutes of a lent GPU are not lost to a mistake in the script."""
import re
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "GPU_CHECK.md"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    assert "**failed**" not in text and "Total:" in text, text
    assert "torch " in text and "transformers " in text and "peft " in text   # the machine's versions
    runs = re.findall(r"`python (run_tofu.py|-m bench) [^`]*`: exit (\d+)", text)
    assert [r[0] for r in runs] == ["run_tofu.py", "-m bench"] and all(code == "0" for _, code in runs), runs
    assert "--lora 8" in text and "| npo |" in text                        # the TOFU table of the LoRA run
    assert re.search(r"\| \S+ \| flat \| off \| ours \| [\d.]+ \|", text)   # the benchmark's row
    memory = re.findall(r"^\| tiny (opt|llama) \| (flat|npo) \| (mixed|bf16) \| (16|-) \| ([\d.]+) \| ([\d.]+) \| "
                        r"([\d.]+) \|$", text, re.M)
    assert {m[:4] for m in memory} == {("opt", "flat", "mixed", "-"), ("llama", "npo", "bf16", "16")}, text  # 12 on a GPU
