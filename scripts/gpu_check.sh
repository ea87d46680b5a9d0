#!/usr/bin/env bash
# GPU check, for whoever has one (this project's CI has no GPU and never runs it).
#
# Runs the quickstart (SmolLM2, 60 edits in 3 batches) three times, with a checkpoint and a
# retention score after every batch: on the CPU, on 1 GPU, and on 2 GPUs with ddp; resumes the
# 2-GPU run (it must edit nothing again); then compares the patches and scores of the GPU runs
# with the CPU run. Exits non-zero if a run fails or the results differ by more than GPU rounding
# explains (MPES stop decisions can flip at ties on a GPU, so the bounds are loose).
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]        # default: gpu_check/
#   PYTHON=python bash scripts/gpu_check.sh       # another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu_check}
COMMON=(--config configs/quickstart.yaml --checkpoint.every_n_batches 1 --model.evaluation.every_n_batches 1)

"$PY" -c "import torch, sys; n = torch.cuda.device_count(); print(f'{n} CUDA device(s)'); sys.exit(0 if n >= 2 else 'needs 2 GPUs')"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

run() {  # name, extra options...
  local name=$1; shift
  echo "== $name"
  "$PY" scripts/train.py fit "${COMMON[@]}" --trainer.default_root_dir "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 8
}
mkdir -p "$OUT"
run cpu --trainer.accelerator cpu --trainer.devices 1
run gpu1 --trainer.accelerator gpu --trainer.devices 1
run gpu2 --trainer.accelerator gpu --trainer.devices 2 --trainer.strategy ddp
run gpu2-resumed --trainer.accelerator gpu --trainer.devices 2 --trainer.strategy ddp \
  --trainer.default_root_dir "$OUT/gpu2" --ckpt_path last

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

out = Path(sys.argv[1])
run = {name: out / name / "lightning_logs" / "version_0" for name in ("cpu", "gpu1", "gpu2")}
results = {name: json.loads((d / "results.json").read_text()) for name, d in run.items()}
patches = {name: load_file(d / "edits.safetensors") for name, d in run.items()}
failed = []
for name in ("gpu1", "gpu2"):
    for module, ref in patches["cpu"].items():
        rel = ((patches[name][module] - ref).norm() / ref.norm()).item()
        print(f"{name} {module}: relative difference of the patch to the CPU run {rel:.2e}")
        if rel > 5e-2:
            failed.append(f"{name} {module} patch differs by {rel:.2e}")
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score"):
        a, b = results["cpu"][key], results[name][key]
        print(f"{name} {key}: {b:.1f} (CPU {a:.1f})")
        if abs(a - b) > 5.0:
            failed.append(f"{name} {key} {b:.1f} vs CPU {a:.1f}")
    if [r["num_edits"] for r in results[name]["retention"]] != [r["num_edits"] for r in results["cpu"]["retention"]]:
        failed.append(f"{name}: retention curve has other points than the CPU run")
if results["gpu2"]["num_edits"] != results["cpu"]["num_edits"]:
    failed.append("the resumed 2-GPU run edited again")
print("\n".join(["FAILED: " + f for f in failed]) if failed else "GPU check passed")
sys.exit(1 if failed else 0)
EOF
