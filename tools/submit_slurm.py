#!/usr/bin/env python
"""Submit ``train_net.py`` to SLURM with submitit; the job requeues itself on timeout or
preemption and resumes from the checkpoint of the iteration it stopped at.

Needs submitit (``pip install -e .[cluster]``). Config and overrides are those of
``train_net.py``; ``--nodes`` x ``--gpus-per-node`` workers (one task per GPU)::

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 \\
        --config-file configs/salt_R_50_FPN_1x.yaml OUTPUT_DIR output/salt_R_50_1x

submitit asks SLURM for SIGUSR2 ``--signal-delay`` seconds before the time limit (SLURM also
sends it on preemption with ``--signal``): every task finishes its iteration, the main process
saves it (``saltnet.engine.PreemptionHook``), then submitit requeues the job, which starts
again with ``--resume``. See docs/CLUSTERS.md.
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import copy
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # for train_net

from detectron2.engine import default_argument_parser  # noqa: E402

from saltnet.engine.launch import launch_from_args  # noqa: E402
from saltnet.engine.preflight import check_command_line  # noqa: E402

try:
    import submitit
except ImportError:  # checked in main(), so that the job class can be imported without it
    submitit = None


class TrainJob:
    """What each task of the job runs: ``train_net.py``'s ``main`` in the job's process group
    (``saltnet.engine.launch`` reads srun's variables). ``checkpoint()`` is submitit's requeue
    hook."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        sys.path.insert(0, REPO_ROOT)  # this class may travel by value (cloudpickle)
        import train_net

        launch_from_args(train_net.main, self.args)

    def checkpoint(self):
        """The job to requeue: the same arguments with ``--resume`` (the checkpoint of the
        stopped iteration is already written by the preemption hook)."""
        args = copy.copy(self.args)
        args.resume = True
        return submitit.helpers.DelayedSubmission(TrainJob(args))


def argument_parser():
    parser = default_argument_parser(__doc__.split("\n\n")[0])
    group = parser.add_argument_group("SLURM (submitit)")
    group.add_argument("--nodes", type=int, default=1, help="machines")
    group.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per machine")
    group.add_argument("--cpus-per-task", type=int, default=8)
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--time", type=int, default=60 * 24, help="time limit per job, minutes")
    group.add_argument("--signal-delay", type=int, default=120, help="SIGUSR2 this many s early")
    group.add_argument("--job-dir", default="output/submitit", help="submitit's logs and pickles")
    group.add_argument("--job-name", default="saltnet")
    group.add_argument(
        "--cluster", default=None, choices=("slurm", "local", "debug"), help="default: detected"
    )
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if submitit is None:
        parser.error("submitit is not installed: pip install submitit (or -e .[cluster]).")
    check_command_line(parser, args.config_file, args.opts, args.resume)  # before the queue
    args.config_file = os.path.abspath(args.config_file)
    # One task per GPU (one on the CPU); launch_from_args checks them against srun's variables.
    args.num_gpus, args.num_machines = max(1, args.gpus_per_node), args.nodes
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster)
    partition = {"slurm_partition": args.partition} if args.partition else {}
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        # Slurm's srun starts one task per GPU; elsewhere (local, debug) the one task spawns them.
        tasks_per_node=args.num_gpus if executor.cluster == "slurm" else 1,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        slurm_signal_delay_s=args.signal_delay,
        **partition,
    )
    job = executor.submit(TrainJob(args))
    print(f"Submitted job {job.job_id}; logs in {args.job_dir}")
    return job


if __name__ == "__main__":
    main()
