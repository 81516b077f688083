"""Running the real training scripts as a user does, in a subprocess."""

import json
import os
import socket
import subprocess
import sys
import time

from safetensors.torch import load_file

from demo import cpu_launch_command


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    "--resolution",
    "32",
    "--train_batch_size",
    "2",
    "--inversion_steps",
    "3",
    "--inpo_inversion_steps",
    "3",
    "--seed",
    "0",
    "--report_to",
    "none",
    "--learning_rate",
    "1e-3",
    # validation off unless a test asks for it (then 2 steps keep it to a moment): it adds about 1.5 s to each run
    "--num_validation_prompts",
    "0",
    "--validation_num_inference_steps",
    "2",
]


def env():
    """The scripts import nothing of this repository, so it is not put on their path."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    e.pop("PYTHONPATH", None)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, args, launcher="python", check=True, timeout=300, num_processes=1):
    """The script with ``args`` in a subprocess: ``launcher="accelerate"`` through ``accelerate launch`` (on
    ``num_processes`` CPU processes), ``"python"`` as a plain script, which runs the same code on one process (an
    Accelerator without a launcher) and starts 3 s sooner; the tests that are about the launch use accelerate."""
    e = env()
    if num_processes > 1:
        # data parallel on the CPU: accelerate's multi-process launcher (torchrun), told to stay on the CPU (gloo)
        e["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
               os.path.join(REPO, script)]  # fmt: skip
    elif launcher == "accelerate":
        cmd = cpu_launch_command(os.path.join(REPO, script))
    else:
        cmd = [sys.executable, os.path.join(REPO, script)]
    proc = subprocess.run(
        cmd + [str(a) for a in args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(output_dir):
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def lora(output_dir):
    return load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def start(script, args, launcher="accelerate", extra_env=None):
    """The script in the background, in its own session (so that a test can signal the launcher alone, or kill the
    whole process group)."""
    path = os.path.join(REPO, script)
    cmd = cpu_launch_command(path) if launcher == "accelerate" else [sys.executable, path]
    return subprocess.Popen(
        cmd + [str(a) for a in args],
        cwd=REPO,
        env=dict(env(), **(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, proc, timeout=240):
    """Polls ``condition()`` every 20 ms while ``proc`` runs."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the moment awaited:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def steps_logged(output_dir):
    path = os.path.join(output_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"loss"' in line for line in f)
