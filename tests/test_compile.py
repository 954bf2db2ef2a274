"""torch.compile of the step loop (Agent.compile_steps): the same losses, gradients and rollouts
as eager on the CPU, and a clean fall-back where torch.compile cannot run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tc.evaluate import evaluate
from tc.model import Agent, ModelConfig, compile_or_warn
from tc.train import TrainConfig, loss_scale, make_batch, run_batch

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = dict(image_dim=16, memory_dim=32, instr_dim=16, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def demos(goto_demos):
    return goto_demos


def gradients(demos, use_thoughts: bool, true_thoughts: bool, compiled: bool) -> tuple[dict, dict]:
    torch.manual_seed(0)
    agent = Agent(ModelConfig(**MODEL, use_thoughts=use_thoughts)).train()
    if compiled:
        assert compile_or_warn(agent, "default", "train.compile")
    cfg = TrainConfig(batch_size=6, recurrence=5, device="cpu")
    # Two batches: the second meets the functions already compiled (no recompilation for new sizes).
    for episodes in (np.arange(4), np.arange(6)):
        agent.zero_grad()
        sums = run_batch(agent, make_batch(demos, episodes, torch.device("cpu")), cfg, true_thoughts, False,
                         loss_scale(demos, cfg))  # fmt: skip
    return sums, {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_thoughts, true_thoughts", [(True, True), (True, False), (False, True)],
                         ids=["tc_teacher_forced", "tc_free_running", "bc"])  # fmt: skip
def test_compiled_steps_train_as_eager(demos, use_thoughts, true_thoughts):
    eager_sums, eager_grads = gradients(demos, use_thoughts, true_thoughts, compiled=False)
    sums, grads = gradients(demos, use_thoughts, true_thoughts, compiled=True)
    assert sums == pytest.approx(eager_sums, rel=1e-5, abs=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["tc", "oracle"])
def test_compiled_agent_acts_as_eager(mode):
    seeds = list(range(5))

    def rollouts(compiled: bool):
        torch.manual_seed(0)
        agent = Agent(ModelConfig(**MODEL))
        if compiled:
            assert compile_or_warn(agent, "default", "evaluate.compile")
        return evaluate(agent, "BabyAI-GoToLocal-v0", seeds, mode, batch_size=3, max_steps=12, progress=False)

    eager, compiled = rollouts(False), rollouts(True)
    assert [(e.actions, e.thoughts, e.success) for e in compiled] == [(e.actions, e.thoughts, e.success) for e in eager]


def test_compile_falls_back_to_eager_where_it_cannot_run(tmp_path):
    # A missing C++ compiler: what torch.compile needs on the CPU (a real failure, nothing mocked).
    code = (
        "import torch\n"
        "from tc.model import Agent, ModelConfig, compile_or_warn\n"
        "agent = Agent(ModelConfig(image_dim=8, memory_dim=8, instr_dim=8))\n"
        "assert not compile_or_warn(agent, 'default', 'train.compile')\n"
        "assert agent.lower.condition.__func__ is type(agent.lower).condition\n"
        "images = torch.zeros(2, 7, 7, 3, dtype=torch.uint8)\n"
        "out = agent.act(images, None, agent.encode_mission(torch.ones(2, 3, dtype=torch.long)), agent.initial_state(2))\n"
        "print(tuple(out.logits.shape))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(2, 7)"
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: train.compile")]
    assert len(warnings) == 1 and "torch.compile does not run here" in warnings[0] and "running eagerly" in warnings[0]
