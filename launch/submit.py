"""Submit a training run from Python with submitit (Slurm, or local processes without Slurm).

    python launch/submit.py --preset tiny --data data/fashion-mnist --out runs/submitted

The job resumes from its --out directory whenever Slurm requeues it (timeout, preemption).
"""

import sys

from rcn_dist.submit import follow, submit

if __name__ == "__main__":
    train_args = sys.argv[1:] or ["--preset", "tiny", "--data", "data/fashion-mnist", "--out", "runs/submitted"]
    out = train_args[train_args.index("--out") + 1]
    job = submit(train_args, folder=f"{out}/submitit", nodes=1, tasks_per_node=1, timeout_min=60)
    print(f"job {job.job_id}")
    print(follow(job))
