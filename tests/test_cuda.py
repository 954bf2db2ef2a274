"""The CUDA code path (fp32, TF32, bfloat16 autocast, torch.compile'd steps, CUDA graphs) against the eager
CPU or CUDA result; skipped without CUDA."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tc.model import Agent, ModelConfig, compile_or_warn
from tc.train import STAT_KEYS, ChunkGraphs, Padding, TrainConfig, loss_scale, make_batch, run_batch, train_update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODEL = ModelConfig(image_dim=16, memory_dim=32, instr_dim=16, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def demos(goto_demos):
    return goto_demos


def gradients(device: str, demos, true_thoughts: bool, amp: bool, compile: str | None = None,
              layout: str = "episodes") -> tuple[dict, dict]:  # fmt: skip
    torch.manual_seed(0)
    agent = Agent(MODEL).to(device).train()
    if compile is not None:
        assert compile_or_warn(agent, compile, "train.compile")  # Triton must work on a CUDA machine
    cfg = TrainConfig(batch_size=6, recurrence=5, device=device.split(":")[0], amp=amp, layout=layout)
    batch = make_batch(demos, np.arange(6), torch.device(device))
    sums = run_batch(agent, batch, cfg, true_thoughts, amp, loss_scale(demos, cfg))
    return sums, {n: p.grad.detach().cpu() for n, p in agent.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 is fp32 on the GPU too, unless a test asks for TF32: cuDNN's convolutions (and RNNs) use
    TensorFloat-32 by default on Ampere and later (``torch.backends.cudnn.allow_tf32``). That alone
    moves 56 of the 140 gradients of the teacher-forced CPU comparison below past its tolerance
    (emulated on the CPU: the convolutions' operands rounded to TF32's 10-bit mantissa; the loss
    terms move by 1e-5), and a batch of another size may take another convolution algorithm,
    rounded otherwise, where the graphs' tests compare shapes token for token."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("layout", ["episodes", "chunks"])
@pytest.mark.parametrize("true_thoughts", [True, False], ids=["teacher_forced", "free_running"])
def test_cuda_fp32_equals_cpu(demos, true_thoughts, layout):
    cpu_sums, cpu_grads = gradients("cpu", demos, true_thoughts, False, layout=layout)
    gpu_sums, gpu_grads = gradients("cuda", demos, true_thoughts, False, layout=layout)
    for k in cpu_sums:
        assert gpu_sums[k] == pytest.approx(cpu_sums[k], rel=1e-4, abs=1e-4), k
    assert cpu_grads.keys() == gpu_grads.keys()
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name], cpu_grads[name], rtol=1e-3, atol=1e-4, msg=name)


def test_cuda_autocast_is_close_to_fp32(demos):
    fp32_sums, fp32_grads = gradients("cuda", demos, True, False)
    amp_sums, amp_grads = gradients("cuda", demos, True, True)
    assert amp_sums["action_nll"] == pytest.approx(fp32_sums["action_nll"], rel=0.05)
    assert amp_sums["thought_nll"] == pytest.approx(fp32_sums["thought_nll"], rel=0.05)
    for name, g in amp_grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    cosine = torch.nn.functional.cosine_similarity(flat(amp_grads), flat(fp32_grads), dim=0)
    assert cosine > 0.99, cosine


def test_cuda_tf32_training_is_close_to_fp32(tmp_path, demos):
    """train.tf32: TensorFloat-32 matmuls in a real training run, close to fp32; and set back for the next run."""
    from tc.train import train

    cfg = TrainConfig(epochs=1, episodes_per_epoch=6, batch_size=3, recurrence=4, warmup_epochs=0, lr_halve_epoch=None,
                      val_episodes=0, device="cuda")
    losses = {}
    for tf32 in (True, False):
        run = train(MODEL, replace(cfg, tf32=tf32), demos, demos, tmp_path / str(tf32), progress=False)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        losses[tf32] = run["history"][-1]["train_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=0.01)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_cuda_compiled_steps_equal_eager(demos, mode, amp):
    eager_sums, eager_grads = gradients("cuda", demos, True, amp)
    sums, grads = gradients("cuda", demos, True, amp, compile=mode)
    tol = dict(rel=0.02) if amp else dict(rel=1e-4, abs=1e-4)
    for k in eager_sums:
        assert sums[k] == pytest.approx(eager_sums[k], **tol), k
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert grads.keys() == eager_grads.keys()
    assert torch.nn.functional.cosine_similarity(flat(grads), flat(eager_grads), dim=0) > (0.99 if amp else 0.9999)


@pytest.mark.parametrize("use_thoughts, amp, compile", [(True, False, None), (True, True, None), (False, False, None),
                                                      (False, True, None), (True, False, "default")],
                         ids=["tc-fp32", "tc-amp", "bc-fp32", "bc-amp", "tc-fp32-compiled"])  # fmt: skip
def test_cuda_graphed_chunks_equal_eager(demos, use_thoughts, amp, compile):
    """ChunkGraphs (train.cuda_graphs) captures and replays; three updates, both teacher-forcing modes;
    compiled: the graphs record the compiled steps' kernels (train.compile with train.cuda_graphs).
    The eager reference trains on the shrinking layout in fp32 (padding and graphs tested together) and
    on the same padded batches in bfloat16: there three SGD steps compound the padded layout's other
    rounding past any useful tolerance (BC on the H200: cosine < 0.99; emulated on the CPU, eager
    padded against shrinking, 0.9994 / 0.9978 / 0.9891 over the updates, each above 0.999 from equal
    parameters), while graphs and eager on one layout should agree (CPU: bit for bit)."""
    def updates(graphs: bool, padded: bool):
        torch.manual_seed(0)
        model = ModelConfig(**{**MODEL.to_dict(), "use_thoughts": use_thoughts})
        agent = Agent(model).cuda().train()
        if graphs and compile is not None:
            assert compile_or_warn(agent, compile, "train.compile")
        cfg = TrainConfig(batch_size=6, recurrence=4, device="cuda", amp=amp)
        optimizer = torch.optim.SGD(agent.parameters(), lr=0.1)
        scale = loss_scale(demos, cfg)
        runner = ChunkGraphs(agent, cfg, scale, amp) if graphs else None
        out = []
        for episodes, coin in ((np.array([3, 0, 5, 1]), True), (np.arange(6), False), (np.arange(2, 6), True)):
            batch = make_batch(demos, episodes, torch.device("cuda"), padding=Padding.of(demos, cfg) if padded else None)
            sums = train_update(agent, optimizer, batch, cfg, coin, amp, scale, runner)
            out.append((sums, torch.cat([p.grad.flatten() for p in agent.parameters()]).cpu()))
        if graphs:
            assert runner.problem is None
            # Both teacher-forcing modes; a last chunk of 2 steps captured in the middle of a batch.
            assert set(runner.graphs) == ({(True, 4), (True, 2), (False, 4), (False, 2)} if use_thoughts else {(True, 4), (True, 2)})
        return out

    tol = dict(rel=0.02) if amp else dict(rel=1e-4, abs=1e-4)
    # In bfloat16 a last-bit difference (a kernel's other reduction order) can flip an argmax: the
    # *_correct counts are compared in fp32 only.
    keys = [k for k in STAT_KEYS if not (amp and k.endswith("_correct"))]
    for (sums, grads), (g_sums, g_grads) in zip(updates(False, padded=amp), updates(True, padded=True)):
        for k in keys:
            assert g_sums[k] == pytest.approx(sums[k], **tol), k
        assert torch.nn.functional.cosine_similarity(g_grads, grads, dim=0) > (0.99 if amp else 0.9999)


@pytest.mark.parametrize("mode, compile", [("tc", None), ("oracle", None), ("bc", None), ("tc", "default")],
                         ids=["tc", "oracle", "bc", "tc-compiled"])  # fmt: skip
def test_cuda_graphed_steps_act_as_eager(mode, compile):
    """evaluate.cuda_graphs (ActGraphs) captures and replays the agent's steps (compiled: their compiled
    kernels): the same rollouts."""
    import copy

    from tc.evaluate import evaluate

    torch.manual_seed(0)
    agent = Agent(ModelConfig(**{**MODEL.to_dict(), "use_thoughts": mode != "bc"})).cuda()
    graphed_agent = copy.deepcopy(agent)
    if compile is not None:
        assert compile_or_warn(graphed_agent, compile, "evaluate.compile")
    run = lambda a, graphs: evaluate(a, "BabyAI-GoToLocal-v0", list(range(7)), mode, batch_size=4, argmax=True,  # noqa: E731
                                     max_steps=12, progress=False, cuda_graphs=graphs)
    eager, graphed = run(agent, False), run(graphed_agent, True)
    assert [(e.actions, e.thoughts, e.success) for e in graphed] == [(e.actions, e.thoughts, e.success) for e in eager]
