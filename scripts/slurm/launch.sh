#!/usr/bin/env bash
# What every r1 batch script runs: one srun task per node, each a torchrun with one process per GPU,
# rendezvous (c10d) on the job's first node. After a requeue (preemption, node failure: the scripts ask
# for --requeue, and r1 checkpoints the last completed step on the SIGTERM that precedes it) the same
# command runs again with --resume.
#
#   launch.sh COMMAND CONFIG [section.key=value ...]      COMMAND: sft | rl | coldstart | distill
#
# Environment: NPROC_PER_NODE (default: the GPUs SLURM gave this node, else 1), MASTER_PORT (default
# derived from the job id), OMP_NUM_THREADS (default: the task's CPUs over the processes).
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
echo "r1 $cmd on $SLURM_NNODES node(s) x $nproc process(es), rendezvous $head_node:$port," \
     "restart ${SLURM_RESTART_COUNT:-0}${resume:+ (resuming)}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    python -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node "$nproc" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" \
    -m r1cli.cli "$cmd" --config "$config" ${resume[@]+"${resume[@]}"} "$@"
