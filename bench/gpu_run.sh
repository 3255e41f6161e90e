# Sourced by the GPU scripts: run NAME SECONDS ARGS... runs one run_validation.py command under the
# harness's own job timeout (SECONDS) into $out/NAME, watching the job's last log line and GPU memory every
# 10 s ($out/NAME.watch); result.json, train.log and metrics.jsonl come back as $out/NAME.*; the exit
# code and wall time go to $out/index.txt. ONLY=name1,name2 runs just those; EXTRA adds options to each.
# $out must be set; PYTHON (default python3) is the harness's interpreter.
run() {  # name, seconds, args...   ONLY=name1,name2 runs just those
  local name=$1 limit=$2; shift 2
  [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$name,"* ]] || return 0
  local started=$(date +%s)
  # the harness's own job timeout ends every rank; `timeout` (later) only guards the CLI itself
  timeout $(( limit + ${CLI_SLACK:-60} )) ${PYTHON:-python3} run_validation.py --device cuda --nproc-per-node 1 --wandb-mode disabled \
      --timeout-per-model "$limit" \
      --output-dir "$out/$name" --run-id run "$@" ${EXTRA:-} > "$out/$name.log" 2>&1 &
  local cli=$!
  while kill -0 $cli 2>/dev/null; do  # where the time goes: the job log's last line and GPU memory, every 10 s
    echo "$(( $(date +%s) - started ))s gpu $(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null) |" \
      "$(tail -qn1 "$out/$name"/run/*/train.log 2>/dev/null | cut -c1-300)" >> "$out/$name.watch"
    sleep 10
  done
  wait $cli
  echo "$name rc=$? $(( $(date +%s) - started ))s" | tee -a "$out/index.txt"
  for r in "$out/$name"/run/*/result.json; do [ -f "$r" ] && cp "$r" "$out/$name.$(basename "$(dirname "$r")").result.json"; done
  # the job's own log (the stack's output, timestamped per line by the harness) and the stack's step metrics
  for f in "$out/$name"/run/*/train.log "$out/$name"/run/*/metrics.jsonl; do
    [ -f "$f" ] && tail -c 400000 "$f" > "$out/$name.$(basename "$(dirname "$f")").$(basename "$f")"; done
  rm -rf "$out/$name"  # the run folders are too deep to come back; result.json and the log do
}
