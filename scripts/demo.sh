#!/usr/bin/env bash
# make demo: what stabilizer is for, in three acts (about 5 minutes on 2 CPU cores).
#   1. the classic failure (fp16 LoRA adapters under AdamW), traced: the preflight names
#      it before step 0, the detector catches it in step 0, the repair fixes it and the
#      run trains on;
#   2. the embedded default run, traced, learning easy-vqa: the real / blank / shuffled
#      accuracy table;
#   3. where the reports are, and how to open them.
# Each act has its own run folder under runs/; a second `make demo` starts them afresh.
set -euo pipefail
BIN="${VENV:-.venv}/bin"
start=$(date +%s)

say() { printf '\n\033[1m== %s\033[0m\n\n' "$*"; }

say "1/3  The classic failure: LoRA adapters and AdamW state in fp16 (--adapter-dtype fp16), traced, --on-anomaly repair"
"$BIN/stabilizer" train --adapter-dtype fp16 --trace --on-anomaly repair \
    --max-steps 40 --max-eval-samples 200 --real-images-only \
    --run-name demo-classic --overwrite

say "2/3  The default run (2,500 steps), traced (--trace --trace-every 10): does the Q-Former see the image?"
"$BIN/stabilizer" train --trace --trace-every 10 --run-name demo-default --overwrite

say "3/3  The reports"
cat <<TEXT
  runs/demo-classic/report.html   the classic failure: preflight, diagnosis card, repair
  runs/demo-default/report.html   the healthy run: per-layer norms across 2,500 steps

  open one:   $BIN/python -m webbrowser runs/demo-classic/report.html
  the rest:   stabilizer --help   (check, replay, eval, predict, report)

demo done in $(( $(date +%s) - start )) s
TEXT
