"""
--with_tracking --report_to tensorboard|wandb|all (open-instruct's flags): the metrics a stage writes to metrics.jsonl,
the same dicts at the same steps, also go to TensorBoard event files (<output_dir>/tensorboard/) and/or a W&B run
(<output_dir>/wandb/). W&B runs offline, so nothing leaves the machine; `wandb sync <output_dir>/wandb/offline-run-*`
uploads a run later. Both packages are optional, imported only when asked for: pip install tensorboard / wandb.
One function, used the same way by sft.py, dpo.py and rlvr.py (on rank 0 only).
"""
import atexit
import os


def start(report_to, output_dir, run_name, config, start_step=0):
    """-> log(metrics): sends one metrics.jsonl line (a dict with "step") to every tracker report_to names. start_step:
    where a --resume run continues; TensorBoard then hides what the interrupted run logged after it, as metrics.jsonl
    drops those lines (W&B starts a new offline run)."""
    loggers = []
    if report_to in ("tensorboard", "all"):
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        atexit.register(writer.close)

        def log_tensorboard(metrics):
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, metrics["step"])
            writer.flush()  # every step, so a killed run keeps what it logged, as metrics.jsonl does

        loggers.append(log_tensorboard)
    if report_to in ("wandb", "all"):
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report_to wandb needs the wandb package: pip install wandb")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tulu3-minimal"), name=run_name, dir=output_dir,
                         mode="offline", config=config)
        atexit.register(run.finish)
        loggers.append(lambda metrics: run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"]))
    return lambda metrics: [log(metrics) for log in loggers]
