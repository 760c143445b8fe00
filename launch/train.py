"""Entry point for launchers: `deepspeed launch/train.py --deepspeed configs/ds.json --preset small`,
`torchrun --nproc_per_node 2 launch/train.py ...`, `srun python launch/train.py ...`,
`mpirun -np 2 python launch/train.py ...` or plain `python launch/train.py ...`.

The same as `rcn train`; everything lives in rcn_dist.train (and rcn_dist.loop).
"""

import sys

if __name__ == "__main__":
    from rcn_dist import signals, testhooks

    # First, before torch and DeepSpeed are imported: a stop signal from now on is recorded and
    # honoured by the training loop, not fatal (rcn_dist.signals).
    signals.catch()
    testhooks.pause("start")

    from rcn_dist.cli import run_main
    from rcn_dist.parallel.teardown import exit_process
    from rcn_dist.train import main

    exit_process(run_main(main, sys.argv[1:]))  # no abort at exit after a distributed run
