"""`python -m latentforge.rl.grpo` on SIGTERM: checkpoint, Ray shut down, exit 0 within seconds, and a relaunch
resumes from that checkpoint; a local Ray binds loopback only."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")


MICRO_MODEL = (
    "model.pattern=M*E model.hidden_size=32 model.num_attention_heads=2 model.num_key_value_heads=1 "
    "model.head_dim=16 model.mamba_num_heads=4 model.mamba_head_dim=16 model.mamba_groups=1 "
    "model.ssm_state_size=8 model.chunk_size=16 model.num_experts=4 model.top_k=2 "
    "model.moe_intermediate_size=16 model.moe_latent_size=16 model.shared_expert_intermediate_size=32 "
    "model.mlp_intermediate_size=32 model.mtp_depths=1"
).split()
# many steps and no periodic checkpoint: only the preemption can write the first one
TINY_RL = [
    "rl.steps=5000",
    "rl.checkpoint_interval=5000",
    "rl.groups_per_step=2",
    "rl.rollout.group_size=2",
    "rl.rollout.sampling.max_new_tokens=8",
    "rl.trainer.micro_batch_size=4",
    "rl.filter_zero_advantage=false",
    "rl.wandb.enabled=false",
    "rl.eval_samples=0",
    "rl.prompts.tasks=[{name:arithmetic,num:200}]",
    "rl.prompts.eval_tasks=[{name:arithmetic,num:2}]",
]


def grpo_command(run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "latentforge.rl.grpo",
        "recipe=grpo_tiny",
        *MICRO_MODEL,
        *TINY_RL,
        f"rl.run_dir={run_dir}",
        *extra,
    ]


def child_env():
    return dict(os.environ, WANDB_MODE="disabled", RAY_DEDUP_LOGS="0")


def wait_for_line(proc, pattern, timeout_s, seen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} in time; output:\n{''.join(seen[-40:])}")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_relaunch_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    seen = []
    proc = subprocess.Popen(
        grpo_command(run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        cwd=os.getcwd(),
    )
    wait_for_line(proc, r"^step 1/5000", 240, seen)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    exit_s = time.monotonic() - signalled
    output = "".join(seen) + rest
    assert proc.returncode == 0, output[-4000:]
    assert exit_s < 30, f"exit took {exit_s:.1f}s"
    stopped = re.search(r"stopping at step (\d+) \(SIGTERM\): checkpoint saved", output)
    assert stopped, output[-4000:]
    step = int(stopped.group(1))
    assert 1 <= step < 5000
    assert "eval after" not in output  # no final evaluation once preempted
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == [f"step_{step:08d}"]  # periodic ones: never

    relaunch = subprocess.run(
        grpo_command(run_dir, f"rl.stop_at_step={step + 1}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert relaunch.returncode == 0, relaunch.stdout[-4000:]
    assert re.search(rf"resumed from \S+ at step {step} ", relaunch.stdout), relaunch.stdout[-4000:]
    assert re.search(rf"^step {step + 1}/5000", relaunch.stdout, re.M), relaunch.stdout[-4000:]


LOOPBACK_PROBE = """
import ray
from latentforge.rl.loop import init_ray
init_ray(None)
try:
    @ray.remote(num_cpus=0)
    def node_ip():
        return ray.util.get_node_ip_address()
    print(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]), ray.get(node_ip.remote()))
finally:
    ray.shutdown()
"""


def test_local_ray_binds_loopback():
    # in its own process: another test module's Ray may be running in this one
    out = subprocess.run(
        [sys.executable, "-c", LOOPBACK_PROBE], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['127.0.0.1'] 127.0.0.1", out.stdout
