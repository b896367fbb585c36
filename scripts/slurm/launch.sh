#!/usr/bin/env bash
# What every r1 batch script runs: one srun task per node, each a torchrun with one process per GPU,
# rendezvous (c10d) on the job's first node. After a requeue (preemption, node failure: the scripts ask
# for --requeue, and r1 checkpoints the last completed step on the SIGTERM that precedes it) the same
# command runs again with --resume.
#
#   launch.sh COMMAND CONFIG [section.key=value ...]      COMMAND: sft | rl | coldstart | distill
#
# Environment: NPROC_PER_NODE (default: the GPUs SLURM gave this node, else 1), MASTER_PORT (default
# derived from the job id), OMP_NUM_THREADS (default: the task's CPUs over the processes), R1_STOP_MARGIN_S
# (default 600).
#
# The job's time limit: a SIGTERM at the limit leaves torchrun 30 s for its workers (Slurm's KillWait is 30 s by
# default too), far less than a 7B step and checkpoint. So r1 gets the job's end time instead (R1_STOP_AT, less
# R1_STOP_MARGIN_S), checkpoints and stops by itself when the next step and its checkpoint would not fit, exits 75,
# and this script requeues the job, which resumes. checkpoint.every_minutes bounds what a crash can cost.
set -euo pipefail
cmd=${1:?usage: sbatch scripts/slurm/<script>.sbatch COMMAND CONFIG [section.key=value ...]}
config=${2:?usage: sbatch scripts/slurm/<script>.sbatch COMMAND CONFIG [section.key=value ...]}
shift 2
gpus=${SLURM_GPUS_ON_NODE:-0}
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
cpus=${SLURM_CPUS_PER_TASK:-$nproc}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
resume=()
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
    resume=(--resume)
fi
end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null || true)
if [[ -n "$end" && "$end" != "N/A" && "$end" != "Unknown" ]] && end_s=$(date -d "$end" +%s 2>/dev/null); then
    export R1_STOP_AT=$(( end_s - ${R1_STOP_MARGIN_S:-600} ))
fi
echo "r1 $cmd on $SLURM_NNODES node(s) x $nproc process(es), rendezvous $head_node:$port," \
     "restart ${SLURM_RESTART_COUNT:-0}${resume:+ (resuming)}"
# (since Slurm 22.05 srun does not inherit --cpus-per-task: without it every rank would share one core)
status=0
srun --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
    python -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node "$nproc" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" \
    -m r1cli.cli "$cmd" --config "$config" ${resume[@]+"${resume[@]}"} "$@" || status=$?
if [[ "$status" -eq 75 ]]; then  # stopped with a checkpoint before the time limit
    echo "r1 stopped before the job's time limit; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
