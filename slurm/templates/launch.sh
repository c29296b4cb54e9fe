# --- launch, signal forwarding and requeue (shared by train.sbatch and sweep.sbatch) ---
# Exit codes are the contract with the trainer: 0 done, 75 stopped after a checkpoint (requeue),
# 3 diverged and 2 configuration error (never requeued).
PYTHON={{python}}
MAX_REQUEUES={{max_requeues}}
{{env_lines}}
{{step_command}}
stop_trainer() {
    echo "[titans-train] $(date -Is) got a stop signal: asking the trainer to checkpoint and exit"
    # To every task of the step (the trainers, or the per-node launchers, which pass it on);
    # never to torchrun itself, which would die of SIGUSR1 and orphan its workers.
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap stop_trainer USR1 TERM
echo "[titans-train] $(date -Is) job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"
"${STEP[@]}" &
step_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting for the step itself.
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"; rc=$?
restarts=${SLURM_RESTART_COUNT:-0}
case $rc in
    0) echo "[titans-train] finished" ;;
    75) if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
            echo "[titans-train] checkpointed and stopped (exit 75): requeue $((restarts + 1)) of $MAX_REQUEUES"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "[titans-train] checkpointed and stopped (exit 75), but $MAX_REQUEUES requeues are used up: not requeued" ;;
    2) echo "[titans-train] configuration error (exit 2): not requeued; fix the recipe and submit again" ;;
    3) echo "[titans-train] the loss diverged (exit 3): not requeued; the last checkpoint predates it" ;;
    *) echo "[titans-train] the step failed with exit code $rc: not requeued" ;;
esac
exit "$rc"
