"""
The trackers people plug in: TensorBoard, Weights & Biases (wandb) and SwanLab, each fed the same lines as
OUT_DIR/metrics.jsonl (train lines: loss, lr, grad_norm, tokens_per_s and the strategy's figures; eval lines:
val_loss, ...), at the same steps, from the master process only.

    python train.py configs/demo.py --log_to=tensorboard,wandb,swanlab --project=astrai-nano --run_name=demo

Each is off until --log_to names it, and its package is imported only then, so none is in requirements.txt
(`pip install tensorboard`, `pip install wandb`, `pip install swanlab`); train.py imports this file only when
--log_to is set. Where the figures go:
- tensorboard: OUT_DIR/tensorboard (`tensorboard --logdir=OUT_DIR`); a scalar per key, the key as its tag.
- wandb: the project --project, the run --run_name, files under OUT_DIR/wandb; the settings as the run's config.
  Offline: WANDB_MODE=offline, then `wandb sync`.
- swanlab: likewise, files under OUT_DIR/swanlog. SWANLAB_MODE=offline (then `swanlab sync`), or local (needs
  `pip install 'swanlab[dashboard]'`); online needs `swanlab login` first.
Resuming (--resume=auto): TensorBoard writes on into the same directory and hides the points a killed run logged
past the checkpoint (purge_step), as metrics.jsonl drops those lines. wandb and SwanLab keep the run's id in
OUT_DIR/wandb_run_id and OUT_DIR/swanlab_run_id and continue that run (resume="allow"); a step the run already
has is not logged again (wandb warns and skips it; the resumed run computes the same figures). Offline, each
process writes a run directory of its own under the same id, which `wandb sync` / `swanlab sync` upload to it.
A run that starts from step 0 starts a new run and a new id.
"""
import importlib
import os

# --log_to name -> (the module it imports, the pip package that has it)
TOOLS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "swanlab": ("swanlab", "swanlab")}


def tracker_problems(log_to):
    """What is wrong with --log_to (a comma list of TOOLS): an unknown name, or a tool whose package is not
    installed, each with what would be right (an empty list: nothing)."""
    problems = []
    for name in [n.strip() for n in log_to.split(",") if n.strip()]:
        if name not in TOOLS:
            problems.append(f"log_to: unknown tracker {name!r}; choose from {', '.join(TOOLS)} (a comma list)")
            continue
        module, package = TOOLS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            problems.append(f"log_to={name} needs the {package} package, which is not installed ({e}): "
                            f"pip install {package}")
    return problems


def saved_run_id(out_dir, tool, step):
    """The id of the run a resumed training continues (None for a run that starts at step 0, or when none is
    saved): OUT_DIR/TOOL_run_id."""
    path = os.path.join(out_dir, f"{tool}_run_id")
    if not step or not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save_run_id(out_dir, tool, run_id):
    with open(os.path.join(out_dir, f"{tool}_run_id"), "w") as f:
        f.write(run_id + "\n")


class TensorBoard:
    def __init__(self, cfg, step, run_name):
        from torch.utils.tensorboard import SummaryWriter
        # events at steps past the checkpoint (a killed run's) are hidden, as metrics.jsonl drops their lines
        self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=step + 1 if step else None)

    def log(self, line):
        for key, value in line.items():
            if key != "step":
                self.writer.add_scalar(key, value, line["step"])
        self.writer.flush()  # as metrics.jsonl is: a killed run loses no line it printed

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, cfg, step, run_name):
        import wandb
        run_id = saved_run_id(cfg.out_dir, "wandb", step)
        self.run = wandb.init(project=cfg.project, name=run_name, dir=cfg.out_dir, config=dict(cfg), id=run_id,
                              resume="allow" if run_id else None)
        save_run_id(cfg.out_dir, "wandb", self.run.id)

    def log(self, line):
        self.run.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])

    def close(self):
        self.run.finish()


class SwanLab:
    def __init__(self, cfg, step, run_name):
        import swanlab
        run_id = saved_run_id(cfg.out_dir, "swanlab", step)
        self.run = swanlab.init(project=cfg.project, name=run_name, log_dir=os.path.join(cfg.out_dir, "swanlog"),
                                config=dict(cfg), id=run_id, resume="allow" if run_id else None)
        save_run_id(cfg.out_dir, "swanlab", self.run.id)

    def log(self, line):
        self.run.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])

    def close(self):
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "swanlab": SwanLab}  # the same names as TOOLS


class Trackers:
    """The trackers --log_to names, opened at `step` (0, or the checkpoint a resumed run starts from); log() sends a
    metrics.jsonl line to each, close() finishes each. Open on the master process only."""

    def __init__(self, cfg, step):
        assert not tracker_problems(cfg.log_to), tracker_problems(cfg.log_to)  # train.py checked them at the start
        run_name = cfg.run_name or os.path.basename(os.path.abspath(cfg.out_dir))
        self.open = []
        for name in dict.fromkeys(n.strip() for n in cfg.log_to.split(",") if n.strip()):
            try:
                self.open.append(TRACKERS[name](cfg, step, run_name))
            except Exception as e:  # not logged in, no network for an online run, ...: stop before training
                self.close()
                raise ValueError(f"log_to={name}: could not start a run: {type(e).__name__}: {e}") from e

    def log(self, line):
        for tracker in self.open:
            tracker.log(line)

    def close(self):
        for tracker in self.open:
            tracker.close()
        self.open = []
