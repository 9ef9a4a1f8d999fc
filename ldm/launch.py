"""``python -m ldm.launch [accelerate launch options] train_ldm.py --config ...``: `accelerate launch`, with the
trainer's stop and exit status kept.

Accelerate's launcher, running one process, gives the trainer 5 seconds after a SIGTERM or Ctrl-C and then kills
it: too short for a real model to finish its step and write its checkpoint. When the trainer exits with an error,
it raises ``CalledProcessError`` with the trainer's stderr, so a one-line error ends in a traceback and exit status
1. This launcher takes the same options and launches the same way (several processes, FSDP and DeepSpeed go
through Accelerate's own launchers), except that with one process it runs the trainer itself: SIGTERM and SIGINT
are passed on, it waits for the trainer to stop (its second signal stops it at once), and it exits with the
trainer's status. With no accelerate config file, the values Accelerate would warn that it defaulted (machines,
mixed precision, dynamo, processes) are set to the same defaults without the warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``, passing SIGTERM and SIGINT on to it, until it exits; its exit status (128 + the signal that
    killed it)."""
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def _quiet_defaults(args) -> None:
    """Accelerate's own defaults for a launch without a config file, set here so that it does not warn."""
    from accelerate.commands.config import default_config_file
    from accelerate.utils import get_distributed_backend, get_torch_accelerator_backend

    if args.config_file is not None or os.path.isfile(default_config_file):
        return
    if args.num_processes is None:
        count = 0
        if not args.cpu:
            device_type, device_module = get_torch_accelerator_backend()
            count = device_module.device_count() if get_distributed_backend(device_type) is not None else 0
        args.num_processes = max(count, 1)
    args.num_machines = args.num_machines or 1
    args.mixed_precision = args.mixed_precision or "no"
    args.dynamo_backend = args.dynamo_backend or "no"


def main(argv=None) -> None:
    import accelerate.commands.launch as launch
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch.launch_command_parser().parse_args(argv)
    _quiet_defaults(args)

    def simple_launcher(args) -> None:
        sys.exit(run_child(*prepare_simple_launcher_cmd_env(args)))

    launch.simple_launcher = simple_launcher  # the one-process path; the others stay Accelerate's
    launch.launch_command(args)


if __name__ == "__main__":
    main()
