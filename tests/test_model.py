import numpy as np
import pytest
import torch

from tc import vocab
from tc.demos import generate_demos, load_demos
from tc.model import (
    Agent,
    ModelConfig,
    lstm_step,
    input_gates,
    GradTape,
    load_agent,
    load_checkpoint,
    run_lstm,
    save_checkpoint,
)
from tc.train import make_batch

TINY = dict(image_dim=16, memory_dim=32, instr_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "pickup"
    generate_demos("BabyAI-PickupLoc-v0", 0, 6, out, noise_rate=0.0, progress=False)
    return load_demos(out)


def tiny_agent(use_thoughts=True, seed=0):
    torch.manual_seed(seed)
    return Agent(ModelConfig(**TINY, use_thoughts=use_thoughts)).eval()


def first_steps(demos, n=3):
    """Observation, mission and thought of the first step of the first ``n`` episodes."""
    rows = demos.offsets[:n]
    return (
        torch.from_numpy(demos.images[rows]),
        torch.from_numpy(demos.directions[rows]).long(),
        torch.from_numpy(demos.missions[:n]).long(),
        torch.from_numpy(demos.thoughts[rows]).long(),
    )


def test_act_shapes_and_batch_first_row_selection(demos):
    agent = tiny_agent()
    images, directions, missions, _ = first_steps(demos)
    enc = agent.encode_mission(missions)
    out = agent.act(images, directions, enc, agent.initial_state(3))
    assert out.logits.shape == (3, 7) and out.thoughts.shape == (3, vocab.MAX_THOUGHT_LEN)
    assert all(v.shape[0] == 3 for v in list(out.state.values()) + list(enc.values()))
    # Greedy thoughts: nothing but <pad> after the first <eos>.
    for row in out.thoughts.tolist():
        if vocab.EOS in row:
            assert set(row[row.index(vocab.EOS) + 1 :]) <= {vocab.PAD}
    # Rows of state / mission encodings can be selected with t[idx] (finished episodes dropped).
    idx = torch.tensor([0, 2])
    out2 = agent.act(images[idx], directions[idx], {k: v[idx] for k, v in enc.items()},
                     {k: v[idx] for k, v in out.state.items()})
    full = agent.act(images, directions, enc, out.state)
    torch.testing.assert_close(out2.logits, full.logits[idx])
    assert torch.equal(out2.thoughts, full.thoughts[idx])


def test_given_thoughts_are_used(demos):
    agent = tiny_agent()
    images, directions, missions, _ = first_steps(demos)
    enc, state = agent.encode_mission(missions), agent.initial_state(3)
    a = torch.from_numpy(vocab.encode_padded(["go to red ball to complete goto mission"] * 3, eos=True))
    b = torch.from_numpy(vocab.encode_padded(["explore unseen area"] * 3, eos=True))
    out_a, out_b = agent.act(images, directions, enc, state, thoughts=a), agent.act(images, directions, enc, state, thoughts=b)
    assert vocab.decode(out_a.thoughts[0]) == "go to red ball to complete goto mission"
    assert torch.equal(out_a.state["prev_thought"], out_a.thoughts)
    assert not torch.allclose(out_a.logits, out_b.logits)
    torch.testing.assert_close(agent.act(images, directions, enc, state, thoughts=a).logits, out_a.logits)
    with pytest.raises(ValueError, match="max_thought_len"):
        agent.act(images, directions, enc, state, thoughts=torch.ones(3, vocab.MAX_THOUGHT_LEN + 1, dtype=torch.long))


def test_bc_has_no_thought_decoder(demos):
    bc, tc = tiny_agent(use_thoughts=False), tiny_agent()
    assert bc.upper is None and not any(n.startswith("upper") or "dec" in n for n, _ in bc.named_parameters())
    assert any("decoder" in n for n, _ in tc.named_parameters())
    images, directions, missions, _ = first_steps(demos)
    out = bc.act(images, directions, bc.encode_mission(missions), bc.initial_state(3))
    assert out.thoughts is None and set(out.state) == {"low_h", "low_c"}


def test_training_layout_matches_step_by_step_acting(demos):
    """The chunked time-major training forward equals acting one step at a time (eval mode)."""
    agent = tiny_agent()
    batch = make_batch(demos, np.arange(4), torch.device("cpu"))
    with torch.no_grad():
        enc = agent.encode_mission(batch.missions)
        state = agent.initial_state(4)
        memory, _ = agent.thought_step(batch.images, batch.sizes, batch.thoughts, batch.prev_thoughts, enc, state)
        logits, _ = agent.lower(batch.images, batch.sizes, enc["low_words"], enc["mask"], state, batch.thoughts)
    step_logits, step_memory = [], []
    for t, n in enumerate(batch.sizes):
        rows = slice(batch.starts[t], batch.starts[t + 1])
        state = {k: v[:n] for k, v in state.items()}
        out = agent.act(batch.images[rows], None, {k: v[:n] for k, v in enc.items()}, state, thoughts=batch.thoughts[rows])
        state = out.state
        step_logits.append(out.logits)
        step_memory.append(out.state["up_h"])
    torch.testing.assert_close(torch.cat(step_logits), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(step_memory), memory, rtol=1e-4, atol=1e-5)


def test_taped_lstm_equals_lstmcell_with_gradients():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(5, 7)
    sizes = [3, 3, 2, 1]
    x = torch.randn(9, 5, requires_grad=True)
    h0 = torch.randn(3, 7, requires_grad=True)
    c0 = torch.randn(3, 7)

    def grads(outputs, h):
        (outputs.square().sum() + h.sum()).backward()
        g = [p.grad.clone() for p in cell.parameters()] + [x.grad.clone(), h0.grad.clone()]
        cell.zero_grad()
        x.grad = h0.grad = None
        return g

    out, h, _ = run_lstm(cell, x, sizes, h0, c0)
    taped = grads(out, h)
    ref_out, hh, cc, start = [], h0, c0, 0
    for n in sizes:
        hh, cc = cell(x[start : start + n], (hh[:n], cc[:n]))
        ref_out.append(hh)
        start += n
    torch.testing.assert_close(out, torch.cat(ref_out))
    for a, b in zip(taped, grads(torch.cat(ref_out), hh)):
        torch.testing.assert_close(a, b)
    # Also the per-step input path used by the lower level (two tapes).
    tapes = GradTape(), GradTape()
    h1, _ = lstm_step(cell, input_gates(cell, x[:3], tapes[0]), h0, c0, tapes[1])
    h2, _ = cell(x[:3], (h0, c0))
    torch.testing.assert_close(h1, h2)


def test_checkpoint_round_trip(tmp_path, demos):
    agent = tiny_agent()
    path = tmp_path / "a.pt"
    save_checkpoint(path, agent, meta={"note": "x"})
    ckpt = torch.load(path, weights_only=True)  # plain data only
    assert ckpt["model_config"]["memory_dim"] == 32 and ckpt["vocab_version"] == vocab.VOCAB_VERSION
    loaded = load_agent(path).eval()
    images, directions, missions, _ = first_steps(demos)
    outs = [a.act(images, directions, a.encode_mission(missions), a.initial_state(3)) for a in (agent, loaded)]
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].thoughts, outs[1].thoughts)


def test_checkpoint_errors_name_file_and_mismatch(tmp_path):
    path = tmp_path / "tc.pt"
    save_checkpoint(path, tiny_agent())
    with pytest.raises(ValueError, match=r"tc\.pt.*memory_dim: checkpoint 32 vs expected 64"):
        load_agent(path, expected=ModelConfig(**{**TINY, "memory_dim": 64}))
    with pytest.raises(ValueError, match=r"tc\.pt.*use_thoughts"):
        load_agent(path, expected=ModelConfig(**TINY, use_thoughts=False))
    # Weights of one architecture under the config of another.
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["use_thoughts"] = False
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt does not fit the BC architecture.*unexpected"):
        load_agent(tmp_path / "bad.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable agent checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt is not an agent checkpoint"):
        load_agent(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_agent(tmp_path / "missing.pt")
