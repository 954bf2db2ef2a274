"""The fixed-shape paths that CUDA graphs replay, on the CPU: padded training chunks (tc.train.Padding)
give the same losses, gradients and BatchNorm statistics as the shrinking time-major layout (real
demos, a tiny model), hold no op a graph cannot hold, and ChunkGraphs / ActGraphs (each replay
eager here) train and act as the eager agent."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tc import vocab
from tc.evaluate import ActGraphs
from tc.model import Agent, BatchNorm2d, ModelConfig, commit_batchnorm, compile_or_warn
from tc.train import ChunkGraphs, Padding, TrainConfig, loss_scale, make_batch, run_batch, train, train_update

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = dict(image_dim=16, memory_dim=32, instr_dim=16, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def demos(goto_demos):
    return goto_demos


def train_chunks(demos, use_thoughts: bool, true_thoughts: bool, padding: Padding | None):
    torch.manual_seed(0)
    agent = Agent(ModelConfig(**MODEL, use_thoughts=use_thoughts)).train()
    cfg = TrainConfig(batch_size=6, recurrence=4, device="cpu")
    results = []
    # A short batch (4 of 6 episodes: two padded episodes) and a full one; episode lengths are
    # no multiple of the recurrence, so the last chunk has padded steps too.
    for episodes in (np.array([3, 0, 5, 1]), np.arange(6)):
        agent.zero_grad()
        batch = make_batch(demos, episodes, torch.device("cpu"), padding=padding)
        sums = run_batch(agent, batch, cfg, true_thoughts, False, loss_scale(demos, cfg))
        bn_sums = [m.update_sums.clone() for m in agent.modules() if isinstance(m, BatchNorm2d)]
        commit_batchnorm(agent)
        results.append((sums, {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}, bn_sums))
    return results


@pytest.mark.parametrize("use_thoughts, true_thoughts", [(True, True), (True, False), (False, True)],
                         ids=["tc_teacher_forced", "tc_free_running", "bc"])  # fmt: skip
def test_padded_chunks_train_as_shrinking_ones(demos, use_thoughts, true_thoughts):
    padding = Padding.of(demos, TrainConfig(batch_size=6, recurrence=4))
    assert padding.thought_len < vocab.MAX_THOUGHT_LEN  # thoughts are cut to the data's longest
    plain = train_chunks(demos, use_thoughts, true_thoughts, None)
    padded = train_chunks(demos, use_thoughts, true_thoughts, padding)
    for (sums, grads, bn), (p_sums, p_grads, p_bn) in zip(plain, padded):
        assert p_sums == pytest.approx(sums, rel=1e-5, abs=1e-5)
        assert p_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        for a, b in zip(p_bn, bn):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 inputs of other shapes: rounding
            assert a[-1] == b[-1]  # the frames counted


def test_padded_batch_layout(demos):
    padding = Padding.of(demos, TrainConfig(batch_size=5, recurrence=4))
    episodes = np.array([2, 4])
    batch = make_batch(demos, episodes, torch.device("cpu"), padding=padding)
    plain = make_batch(demos, episodes, torch.device("cpu"))
    steps = len(plain.sizes)
    assert len(batch.sizes) == padding.steps(steps) and set(batch.sizes) == {5}
    assert batch.frames == plain.frames == int(batch.valid.sum())
    assert batch.missions.shape == (5, demos.missions.shape[1])
    assert batch.thoughts.shape[1] == padding.thought_len
    # The real rows, in time-major order, are the plain batch's rows.
    valid = batch.valid
    assert torch.equal(batch.images[valid], plain.images)
    assert torch.equal(batch.actions[valid], plain.actions)
    assert torch.equal(batch.thoughts[valid], plain.thoughts[:, : padding.thought_len])
    assert not (plain.thoughts[:, padding.thought_len :] != vocab.PAD).any()
    with pytest.raises(ValueError, match="does not fit a padding of 5"):
        make_batch(demos, np.arange(6), torch.device("cpu"), padding=padding)


def test_padded_steps_are_whole_chunks_then_a_bucket(demos):
    padding = Padding(episodes=180, recurrence=80, step_bucket=16, thought_len=12, mission_len=20)
    assert [padding.steps(n) for n in (1, 16, 17, 79, 80, 87, 160, 161, 250)] == [16, 16, 32, 80, 80, 96, 160, 176, 256]
    assert Padding.of(demos, TrainConfig(recurrence=80)).step_bucket == 16  # at most 5 last-chunk lengths


def test_fixed_word_encoding_equals_packed_one():
    torch.manual_seed(0)
    agent = Agent(ModelConfig(**MODEL))
    tokens = torch.tensor([[5, 9, 2, 0, 0], [7, 2, 0, 0, 0], [4, 4, 4, 6, 2], [5, 9, 2, 0, 0]])
    for thoughts in (True, False):
        words, pads = agent.perception.words(tokens, thoughts)
        fixed_words, fixed_pads = agent.perception.words(tokens, thoughts, fixed=True)
        assert torch.equal(pads, tokens == vocab.PAD) and torch.equal(fixed_pads, pads)
        assert not words[pads].any() and not fixed_words[pads].any()
        torch.testing.assert_close(fixed_words, words, rtol=1e-5, atol=1e-6)


def graph_updates(demos, use_thoughts: bool, graphs: bool, compiled: bool = False):
    """Two updates (teacher-forced, then free-running for TC) through ``train_update``, with or without
    ChunkGraphs, with or without the compiled steps."""
    torch.manual_seed(0)
    agent = Agent(ModelConfig(**MODEL, use_thoughts=use_thoughts)).train()
    if compiled:
        assert compile_or_warn(agent, "default", "train.compile")
    cfg = TrainConfig(batch_size=6, recurrence=4, device="cpu")
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.1)  # Adam would blow up the rounding noise of zero gradients
    scale = loss_scale(demos, cfg)
    runner = ChunkGraphs(agent, cfg, scale, False) if graphs else None
    padding = Padding.of(demos, cfg) if graphs else None
    results = []
    for episodes, coin in ((np.array([3, 0, 5, 1]), True), (np.arange(6), not use_thoughts), (np.arange(2, 6), True)):
        batch = make_batch(demos, episodes, torch.device("cpu"), padding=padding)
        sums = train_update(agent, optimizer, batch, cfg, coin, False, scale, runner)
        results.append((sums, {n: p.grad.clone() for n, p in agent.named_parameters()}))
    if graphs:  # last chunks of several lengths: the state passes from one graph to another
        assert {steps for _, steps in runner.graphs} == {4, 2}  # the longest episode: 6 steps
    return results, agent.state_dict()


@pytest.mark.parametrize("use_thoughts, compiled", [(True, False), (False, False), (True, True)],
                         ids=["tc", "bc", "tc_compiled"])  # fmt: skip
def test_chunk_graphs_train_as_eager(demos, use_thoughts, compiled):
    # On the CPU, ChunkGraphs runs each "replay" eagerly: everything but the CUDA capture is checked here
    # (static inputs refilled, state carried between chunks and reset between batches, gradients and
    # BatchNorm sums accumulated); tests/test_cuda.py checks the capture. Compiled (train.compile with
    # train.cuda_graphs): the compiled functions are what a graph records, compiled in its warm-up runs.
    eager, eager_weights = graph_updates(demos, use_thoughts, graphs=False)
    graphed, graphed_weights = graph_updates(demos, use_thoughts, graphs=True, compiled=compiled)
    for (sums, grads), (g_sums, g_grads) in zip(eager, graphed):
        assert g_sums == pytest.approx(sums, rel=1e-5, abs=1e-5)
        for name in grads:
            # Elements near 0 beside large ones (a FiLM shift's weight, which BatchNorm follows) carry
            # the float32 rounding of the tensor's scale: compiled kernels sum in another order.
            atol = 1e-6 + 1e-4 * grads[name].abs().max().item()
            torch.testing.assert_close(g_grads[name], grads[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for name in eager_weights:  # BatchNorm running statistics included
        torch.testing.assert_close(graphed_weights[name], eager_weights[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("true_thoughts", [True, False], ids=["teacher_forced", "free_running"])
def test_chunk_graphs_under_autocast_train_as_eager(demos, true_thoughts):
    # bfloat16 autocast (train.amp; on the CPU here): the memory the decoding between the two graphs
    # starts from, and so its gradient buffers, stay float32; the gradients are those of eager training.
    def gradients(graphs: bool):
        torch.manual_seed(0)
        agent = Agent(ModelConfig(**MODEL)).train()
        cfg = TrainConfig(batch_size=6, recurrence=4, device="cpu")
        scale = loss_scale(demos, cfg)
        runner = ChunkGraphs(agent, cfg, scale, True) if graphs else None
        agent.zero_grad() if runner is None else runner.zero_grad()
        batch = make_batch(demos, np.arange(6), torch.device("cpu"), padding=Padding.of(demos, cfg) if graphs else None)
        sums = run_batch(agent, batch, cfg, true_thoughts, True, scale) if runner is None else runner.run_batch(batch, true_thoughts)
        assert runner is None or runner.problem is None
        return sums, torch.cat([p.grad.flatten() for p in agent.parameters()])

    (sums, grads), (g_sums, g_grads) = gradients(False), gradients(True)
    for k in ("frames", "action_nll", "thought_tokens", "thought_nll"):
        assert g_sums[k] == pytest.approx(sums[k], rel=0.01), k
    assert torch.nn.functional.cosine_similarity(g_grads, grads, dim=0) > 0.99


def test_failed_capture_trains_the_batch_eagerly_from_its_start(demos, capsys):
    # The first capture fails in the lower level, after the upper level's BatchNorm calls: the
    # batch is trained eagerly from its start, with none of the failed pass's statistics.
    def update(runner_of):
        torch.manual_seed(0)
        agent = Agent(ModelConfig(**MODEL)).train()
        cfg = TrainConfig(batch_size=6, recurrence=4, device="cpu")
        scale, optimizer = loss_scale(demos, cfg), torch.optim.SGD(agent.parameters(), lr=0.1)
        runner = runner_of(agent, cfg, scale)
        sums = train_update(agent, optimizer, make_batch(demos, np.arange(6), torch.device("cpu"),
                                                         padding=Padding.of(demos, cfg)), cfg, True, False, scale, runner)
        return sums, runner, agent.state_dict()

    def failing(agent, cfg, scale):
        lower = agent.lower.forward

        def fail_once(*args, **kwargs):
            agent.lower.forward = lower
            raise RuntimeError("capture failed\nsecond line")

        agent.lower.forward = fail_once
        return ChunkGraphs(agent, cfg, scale, False)

    eager_sums, _, eager_weights = update(lambda agent, cfg, scale: None)
    sums, runner, weights = update(failing)
    assert runner.problem == "RuntimeError: capture failed"
    assert "capturing a chunk failed (RuntimeError: capture failed); training eagerly" in capsys.readouterr().err
    assert sums == pytest.approx(eager_sums, rel=1e-6)
    for name in eager_weights:  # the BatchNorm running statistics among them
        torch.testing.assert_close(weights[name], eager_weights[name], rtol=1e-6, atol=1e-7, msg=name)


def test_cuda_graphs_off_cuda_warn_and_train_eagerly(tmp_path, demos, capsys):
    cfg = TrainConfig(epochs=1, episodes_per_epoch=6, batch_size=3, recurrence=4, warmup_epochs=0, lr_halve_epoch=None,
                      val_episodes=0, device="cpu", threads=1)
    model = ModelConfig(**MODEL)
    eager = train(model, cfg, demos, demos, tmp_path / "eager", progress=False)
    capsys.readouterr()
    graphed = train(model, replace(cfg, cuda_graphs=True), demos, demos, tmp_path / "graphs", progress=False)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == ["warning: train.cuda_graphs: needs one process on a CUDA device (here: 1 on cpu); training eagerly"]
    assert graphed["history"] == [{**row, "wall_time_s": graphed["history"][0]["wall_time_s"]} for row in eager["history"]]


class HostSyncs(TorchDispatchMode):
    """Records the ops that a CUDA graph cannot hold (a host synchronisation or a shape read off the
    data): item / bool (``_local_scalar_dense``), unique, packing, boolean indexing, tensors made
    from Python values (``lift_fresh``: a host-to-device copy on a GPU)."""

    BAD = {"_local_scalar_dense", "_unique2", "unique_dim", "_pack_padded_sequence", "nonzero", "masked_select",
           "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.found = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BAD:
            self.found.add(name)
        if name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.found.add("index with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("use_thoughts, true_thoughts", [(True, True), (True, False), (False, True)],
                         ids=["tc_teacher_forced", "tc_free_running", "bc"])  # fmt: skip
def test_fixed_chunk_has_nothing_a_cuda_graph_cannot_hold(demos, use_thoughts, true_thoughts):
    torch.manual_seed(0)
    agent = Agent(ModelConfig(**{**MODEL, "dropout": 0.2, "attn_dropout": 0.1}, use_thoughts=use_thoughts)).train()
    cfg = TrainConfig(batch_size=6, recurrence=4, device="cpu")
    runner = ChunkGraphs(agent, cfg, loss_scale(demos, cfg), False)
    runner.zero_grad()
    batch = make_batch(demos, np.arange(5), torch.device("cpu"), padding=Padding.of(demos, cfg))
    rows = slice(0, 4 * 6)
    inputs = {"images": batch.images[rows], "actions": batch.actions[rows], "thoughts": batch.thoughts[rows],
              "valid": batch.valid[rows], "missions": batch.missions}  # fmt: skip
    state = agent.initial_state(6)
    grad_memory = {k: torch.zeros(4 * 6, 32) for k in "hc"} if use_thoughts else {}
    with HostSyncs() as fixed:  # what the two graphs record: the forward, then the gradients and the state updates
        outputs = runner.forward(inputs, state, true_thoughts)
        runner.backward(state, grad_memory)
    assert fixed.found == set()
    if use_thoughts:  # the teacher-forced decoding between them runs eagerly, at the data's sizes
        with HostSyncs() as decoding:
            runner.decode(inputs, outputs, grad_memory)
        assert "nonzero" in decoding.found
    with HostSyncs() as plain:  # what the check finds in the shrinking layout
        run_batch(agent, make_batch(demos, np.arange(5), torch.device("cpu")), cfg, true_thoughts, False,
                  loss_scale(demos, cfg))  # fmt: skip
    assert {"unique_dim", "_pack_padded_sequence", "_local_scalar_dense"} <= plain.found, plain.found


@pytest.mark.parametrize("kind", ["tc", "oracle", "bc"])
def test_act_graphs_act_as_the_agent(kind):
    # Off CUDA each replay runs eagerly: the padding of rows and words, the graph keys and the
    # outputs' rows are checked here; tests/test_cuda.py checks the capture.
    torch.manual_seed(0)
    agent = Agent(ModelConfig(**MODEL, use_thoughts=kind != "bc")).eval()
    act = ActGraphs(agent, rows=5)
    for n, mission_len in ((5, 6), (3, 6), (2, 11)):
        images = torch.randint(0, 6, (n, 7, 7, 3), dtype=torch.uint8)
        missions = torch.randint(3, vocab.VOCAB_SIZE, (n, mission_len))
        missions[0, mission_len - 2 :] = vocab.PAD  # a shorter mission
        with torch.inference_mode():
            mission = agent.encode_mission(missions)
            state = {k: torch.randn_like(v) for k, v in agent.initial_state(n).items()}
            thoughts = torch.randint(3, vocab.VOCAB_SIZE, (n, vocab.MAX_THOUGHT_LEN)) if kind == "oracle" else None
            want, got = agent.act(images, None, mission, state, thoughts), act(images, None, mission, state, thoughts)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        assert (got.thoughts is None) == (want.thoughts is None)
        if want.thoughts is not None:
            assert torch.equal(got.thoughts, want.thoughts)
        assert got.state.keys() == want.state.keys()
        for k in want.state:
            torch.testing.assert_close(got.state[k], want.state[k], rtol=1e-5, atol=1e-6)
    thought_width = vocab.MAX_THOUGHT_LEN if kind == "oracle" else None
    assert set(act.graphs) == {(8, thought_width), (16, thought_width)}  # mission words in multiples of 8
