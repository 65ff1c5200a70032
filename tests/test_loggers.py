"""--log_to as a user runs it: TensorBoard, wandb (offline) and SwanLab (offline) each record the figures of
metrics.jsonl at the same steps, a resumed run continues the same run, and an unknown tracker or a missing package
stops train.py before training. Nothing reaches the network: the tools run offline, and every run has a timeout."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_train import ENV, ROOT, common, demo, run, torchrun  # noqa: F401 (demo: the tiny data fixture)


def offline_env(tmp_path):
    """Every file the tools write (caches, settings, logins) under tmp_path, and no tool online."""
    home = tmp_path / "home"
    return {**ENV, "HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home),
            "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
            "WANDB_DATA_DIR": str(home / "wandb-data"), "SWANLAB_MODE": "offline",
            "SWANLAB_CONFIG_DIR": str(home / "swanlab-config")}


def train(env, *args):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def metrics_by_step(out):
    """metrics.jsonl as {step: {key: value}}, a step's train and val lines together."""
    steps = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        steps.setdefault(row.pop("step"), {}).update(row)
    return steps


# -----------------------------------------------------------------------------
# each tool's figures, read back from its own files as [(run id, {step: {key: value}}, finished), ...] in the order
# written (finished: the run's closing record is there)


def tensorboard_runs(out):
    """One run: the event files of OUT_DIR/tensorboard as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = {}
    for tag in events.Tags()["scalars"]:
        scalars = events.Scalars(tag)
        assert len({e.step for e in scalars}) == len(scalars), f"{tag}: a step twice (a killed run's not purged)"
        for event in scalars:
            steps.setdefault(event.step, {})[tag] = event.value
    return [(None, steps, True)]  # an event file has no closing record


def leveldb_records(path, header_length=7, block=32768):
    """The records of a wandb .wandb file (a LevelDB log: 32 KiB blocks of crc32, length, type, data)."""
    import struct
    data, records, pending, pos = open(path, "rb").read(), [], b"", header_length
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, or the LAST piece of one
            records.append(pending)
            pending = b""
    return records


def wandb_runs(out):
    from wandb.proto import wandb_internal_pb2
    runs = []
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")), key=os.path.getmtime):
        run_id, steps, finished = None, {}, False
        for data in leveldb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                steps.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
            finished = finished or record.WhichOneof("record_type") == "exit"
        runs.append((run_id, steps, finished))
    return runs


def swanlab_runs(out):
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    runs = []
    for path in sorted(glob.glob(str(out / "swanlog" / "run-*" / "run-*.swanlab")), key=os.path.getmtime):
        reader, steps, finished = DataStoreReader(), {}, False
        reader.open(path)
        for data in reader:
            record = Record()
            record.ParseFromString(data)
            if record.HasField("scalar"):
                steps.setdefault(record.scalar.step, {})[record.scalar.key] = record.scalar.value.number
            finished = finished or record.HasField("finish")
        reader.close()
        runs.append((os.path.basename(path)[4:-len(".swanlab")], steps, finished))
    return runs


READERS = {"tensorboard": tensorboard_runs, "wandb": wandb_runs, "swanlab": swanlab_runs}


def assert_same_figures(recorded, expected, tool):
    assert sorted(recorded) == sorted(expected), f"{tool}: steps {sorted(recorded)}, metrics.jsonl {sorted(expected)}"
    for step, row in expected.items():
        assert recorded[step] == pytest.approx(row, rel=1e-6), f"{tool} at step {step}"  # TensorBoard: float32


@pytest.mark.parametrize("tool", ["tensorboard", "wandb", "swanlab"])
def test_tracker_records_the_figures_of_metrics_jsonl_and_a_resume_continues_its_run(demo, tmp_path, tool):
    pytest.importorskip(tool)  # requirements-dev.txt lists each
    env, out = offline_env(tmp_path), tmp_path / "out"
    args = [f"--log_to={tool}", "--eval_interval=3", "--ckpt_interval=3", "--keep_checkpoints=3", "--eval_iters=2"]
    train(env, *common(demo, out, "--max_iters=6", *args))
    first = metrics_by_step(out)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(first[6]) and len(first) == 6
    runs = READERS[tool](out)
    assert len(runs) == 1 and runs[0][2], f"{tool}: {len(runs)} runs, finished: {[r[2] for r in runs]}"
    assert_same_figures(runs[0][1], first, tool)

    # a run killed after step 6 but before its checkpoint: resumed from ckpt-3, on to step 9
    shutil.rmtree(out / "ckpt-6")
    shutil.rmtree(out / "final")
    assert "resumed from" in train(env, *common(demo, out, "--max_iters=9", "--resume=auto", *args))
    final = metrics_by_step(out)
    assert sorted(final) == list(range(1, 10))
    runs = READERS[tool](out)
    if tool == "tensorboard":  # one directory; the killed run's steps 4-6 are hidden, the resumed run's shown
        assert_same_figures(runs[0][1], final, tool)
    else:  # offline, each process writes a local run of its own, under the saved id: `sync` uploads both to it
        assert len(runs) == 2 and runs[0][0] == runs[1][0] == open(out / f"{tool}_run_id").read().strip() and runs[1][2]
        assert_same_figures(runs[1][1], {s: row for s, row in final.items() if s > 3}, tool)


def test_trackers_run_on_the_master_process_only(demo, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "ddp"
    torchrun(*common(demo, out, "--max_iters=4", "--eval_interval=2", "--log_to=tensorboard"))
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 1
    assert_same_figures(tensorboard_runs(out)[0][1], metrics_by_step(out), "tensorboard")


@pytest.mark.parametrize("tool,module", [("wandb", "wandb"), ("swanlab", "swanlab"),
                                         ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_stops_before_training_and_names_the_pip_command(demo, tmp_path, tool, module):
    out = tmp_path / "out"
    # the package hidden: a None entry in sys.modules makes `import` raise ImportError
    script = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = {common(demo, out, '--max_iters=2')!r} "
              f"+ ['--log_to=tensorboard,{tool}']; runpy.run_path('train.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=offline_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert f"log_to={tool} needs the {tool} package" in p.stderr and f"pip install {tool}" in p.stderr, p.stderr
    assert not (out / "metrics.jsonl").exists()  # stopped before training


def test_an_unknown_tracker_is_an_error_listing_the_known_ones(demo, tmp_path):
    p = run(*common(demo, tmp_path / "out", "--max_iters=2", "--log_to=tensorbord"), check=False, timeout=120)
    assert p.returncode != 0
    assert "unknown tracker 'tensorbord'; choose from tensorboard, wandb, swanlab" in p.stderr, p.stderr


def test_a_signal_stop_finishes_every_run(demo, tmp_path):
    """Ctrl-C reaches the whole process group (wandb's and SwanLab's helper processes too): the step finishes, the
    checkpoint is saved and every tracker's run is finished with every figure of metrics.jsonl."""
    for tool in READERS:
        pytest.importorskip(tool)
    out = tmp_path / "stop"
    p = subprocess.Popen([sys.executable, *common(demo, out, "--max_iters=100000", "--ckpt_interval=0",
                                                  "--eval_interval=5", "--eval_iters=2",
                                                  "--log_to=tensorboard,wandb,swanlab")],
                         cwd=ROOT, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(metrics_by_step(out)) < 12:
        assert time.time() < deadline and p.poll() is None, p.communicate()[0][-3000:] if p.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "stopped by signal" in log, log[-3000:]
    expected = metrics_by_step(out)
    for tool, reader in READERS.items():
        runs = reader(out)
        assert len(runs) == 1 and runs[0][2], f"{tool}: {len(runs)} runs, finished: {[r[2] for r in runs]}"
        assert_same_figures(runs[0][1], expected, tool)
