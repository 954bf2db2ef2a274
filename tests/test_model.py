import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tc import vocab
from tc.checkpoint import load_agent, load_checkpoint, save_checkpoint
from tc.demos import generate_demos, load_demos
from tc.kernels import TapedLinear, TapedLSTMCell, per_step
from tc.model import Agent, BatchNorm2d, FiLMBlock, ModelConfig, commit_batchnorm, count_parameters, film_modulation, film_pool
from tc.train import TrainConfig, loss_scale, make_batch, run_batch

TINY = dict(image_dim=16, memory_dim=32, instr_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "pickup"
    generate_demos("BabyAI-PickupLoc-v0", 0, 6, out, noise_rate=0.0, progress=False)
    return load_demos(out)


def tiny_agent(use_thoughts=True, seed=0, **kw):
    torch.manual_seed(seed)
    return Agent(ModelConfig(**TINY, use_thoughts=use_thoughts, **kw)).eval()


def first_steps(demos, n=3):
    """Observation, mission and thought of the first step of the first ``n`` episodes."""
    rows = demos.offsets[:n]
    return (
        torch.from_numpy(demos.images[rows]),
        torch.from_numpy(demos.directions[rows]).long(),
        torch.from_numpy(demos.missions[:n]).long(),
        torch.from_numpy(demos.thoughts[rows]).long(),
    )


def test_paper_size_parameter_counts():
    """Within 1% of the public code's 82,543,212 (TC) and 20,550,920 (BC) parameters at paper size."""
    paper = dict(image_dim=128, memory_dim=2048, instr_dim=256)
    with torch.device("meta"):  # counts only: no memory, no initialisation cost
        tc, bc = Agent(ModelConfig(**paper)), Agent(ModelConfig(**paper, use_thoughts=False))
    assert count_parameters(tc) == pytest.approx(82_543_212, rel=0.01)
    assert count_parameters(bc) == pytest.approx(20_550_920, rel=0.01)
    # The structure: one shared perception, BC is the action generator alone on the mission.
    names = {n.split(".")[0] for n, _ in tc.named_parameters()}
    assert names == {"perception", "upper", "lower"}
    assert {n.split(".")[0] for n, _ in bc.named_parameters()} == {"perception", "lower"}
    assert not any("thought" in n for n, _ in bc.named_parameters())


def test_babyai_initialisation():
    agent = tiny_agent()
    for name, m in agent.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.testing.assert_close(m.weight.norm(dim=1), torch.ones(m.out_features), msg=name)
            assert not m.bias.any(), name


def test_act_shapes_and_batch_first_row_selection(demos):
    agent = tiny_agent()
    images, directions, missions, _ = first_steps(demos)
    enc = agent.encode_mission(missions)
    out = agent.act(images, directions, enc, agent.initial_state(3))
    assert out.logits.shape == (3, 7) and out.thoughts.shape == (3, vocab.MAX_THOUGHT_LEN)
    assert all(v.shape[0] == 3 for v in list(out.state.values()) + list(enc.values()))
    for row in out.thoughts.tolist():  # greedy thoughts: no <pad>/<bos> before <eos>, nothing but <pad> after
        end = row.index(vocab.EOS) if vocab.EOS in row else len(row)
        assert vocab.PAD not in row[:end] and vocab.BOS not in row[:end]
        assert set(row[end + 1 :]) <= {vocab.PAD}
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
    assert not torch.allclose(out_a.logits, out_b.logits)
    assert not torch.allclose(out_a.state["hist_h"], out_b.state["hist_h"])  # the thought went into the history
    torch.testing.assert_close(agent.act(images, directions, enc, state, thoughts=a).logits, out_a.logits)
    with pytest.raises(ValueError, match="max_thought_len"):
        agent.act(images, directions, enc, state, thoughts=torch.ones(3, vocab.MAX_THOUGHT_LEN + 1, dtype=torch.long))


def test_bc_acts_on_the_mission_alone(demos):
    bc = tiny_agent(use_thoughts=False)
    images, directions, missions, _ = first_steps(demos)
    out = bc.act(images, directions, bc.encode_mission(missions), bc.initial_state(3))
    assert out.thoughts is None and out.thought_logits is None and set(out.state) == {"low_h", "low_c"}


@pytest.mark.parametrize("given", [True, False], ids=["given_thoughts", "free_running"])
def test_training_layout_matches_step_by_step_acting(demos, given):
    """The chunked time-major forward equals acting one step at a time (eval mode), with the
    true thoughts given or with the agent's own greedy thoughts (free running)."""
    agent = tiny_agent()
    batch = make_batch(demos, np.arange(4), torch.device("cpu"))
    with torch.no_grad():
        enc = agent.encode_mission(batch.missions)
        state = agent.initial_state(4)
        chunk = agent(batch.images, batch.sizes, enc, state, thoughts=batch.thoughts if given else None)
    steps = []
    for t, n in enumerate(batch.sizes):
        rows = slice(batch.starts[t], batch.starts[t + 1])
        state = {k: v[:n] for k, v in state.items()}
        out = agent.act(batch.images[rows], None, {k: v[:n] for k, v in enc.items()}, state,
                        thoughts=batch.thoughts[rows] if given else None)
        state = out.state
        steps.append(out)
    torch.testing.assert_close(torch.cat([o.logits for o in steps]), chunk.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.cat([o.thoughts for o in steps]), chunk.thoughts)
    for k in chunk.state:
        torch.testing.assert_close(state[k], chunk.state[k], rtol=1e-4, atol=1e-5)
    if not given:  # a changing, non-empty flow of thoughts (the test would be vacuous otherwise)
        assert (chunk.thoughts[:, 0] != vocab.EOS).any()


def test_teacher_forced_decoding_equals_a_plain_loop(demos):
    """Sorted, shrinking-set decoding gives each word the logits of a plain per-row LSTM loop."""
    agent = tiny_agent()
    up, emb = agent.upper, agent.perception.word_embedding
    targets = torch.from_numpy(demos.thoughts[[0, 5, 9, 14, 20]]).long()
    targets[2] = vocab.PAD
    targets[2, 0] = vocab.EOS  # a thought of <eos> alone
    torch.manual_seed(1)
    h, c = torch.randn(5, 32), torch.randn(5, 32)
    logits = up.decode_teacher_forced(h, c, targets, emb)
    expected = []
    for i in range(5):
        hi, ci, prev = h[i : i + 1], c[i : i + 1], vocab.BOS
        for word in targets[i][targets[i] != vocab.PAD].tolist():
            hi, ci = up.decoder(emb(torch.tensor([prev])), (hi, ci))
            expected.append(up.decoder_out(hi)[0])
            prev = word
    assert logits.shape == (int((targets != vocab.PAD).sum()), vocab.VOCAB_SIZE)
    torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eos_bias", [0.25, 0.45])  # some rows reach the cap / all end by word 3
@pytest.mark.parametrize("early_stop", [True, False])
def test_greedy_decoding_equals_a_plain_loop(eos_bias, early_stop):
    """Batched greedy decoding writes each row's thought as a per-row loop does: the argmax
    word but never <pad> or <bos>, up to its <eos> or the cap, then <pad>."""
    agent = tiny_agent()
    up, emb, cap = agent.upper, agent.perception.word_embedding, agent.cfg.max_thought_len
    with torch.no_grad():
        up.decoder_out.bias[vocab.EOS] = eos_bias  # thoughts of different lengths from random weights
    torch.manual_seed(1)
    h, c = torch.randn(8, 32), torch.randn(8, 32)
    expected = []
    with torch.no_grad():
        for i in range(8):
            hi, ci, word, row = h[i : i + 1], c[i : i + 1], vocab.BOS, []
            while len(row) < cap and word != vocab.EOS:
                hi, ci = up.decoder(emb(torch.tensor([word])), (hi, ci))
                scores = up.decoder_out(hi)[0]
                scores[[vocab.PAD, vocab.BOS]] = float("-inf")
                word = int(scores.argmax())
                row.append(word)
            expected.append(row + [vocab.PAD] * (cap - len(row)))
    out = up.decode_greedy(h, c, emb, early_stop=early_stop)
    assert out.tolist() == expected
    lengths = (out != vocab.PAD).sum(1)
    assert len(set(lengths.tolist())) >= 3 and (lengths < cap).any()
    assert (lengths == cap).any() == (eos_bias == 0.25)


def test_thought_loss_trains_the_shared_perception(demos):
    """The thought NLL alone reaches the shared image stem, word embedding and mission GRU;
    the action generator gets nothing from it."""
    agent = tiny_agent().train()
    batch = make_batch(demos, np.arange(3), torch.device("cpu"))
    out = agent(batch.images, batch.sizes, agent.encode_mission(batch.missions), agent.initial_state(3),
                thoughts=batch.thoughts, targets=batch.thoughts)
    words = batch.thoughts[batch.thoughts != vocab.PAD]
    torch.nn.functional.cross_entropy(out.thought_logits, words).backward()
    p = agent.perception
    for name, param in [("image embedding", p.image_embedding.weight), ("image conv", p.image_conv[0].weight),
                        ("word embedding", p.word_embedding.weight), ("mission GRU", p.mission_rnn.weight_ih_l0),
                        ("thought GRU", p.thought_rnn.weight_ih_l0)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(q.grad is None or not q.grad.any() for q in agent.lower.parameters())


def test_batchnorm_running_statistics_weigh_every_frame_of_the_update():
    """Calls of 7, 2 and 1 rows (time steps of a shrinking batch): the running statistics
    become those of all 10 frames, not those of the last call."""
    torch.manual_seed(0)
    bn = BatchNorm2d(3)
    xs = [torch.randn(n, 3, 2, 2) * (i + 1) + i for i, n in enumerate((7, 2, 1))]
    for x in xs:
        y = bn(x)  # each call is normalised by its own rows, as nn.BatchNorm2d does
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    assert torch.equal(bn.running_mean, torch.zeros(3))  # nothing moves before the commit
    commit_batchnorm(bn)
    frames = torch.cat(xs).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(bn.running_mean, 0.1 * frames.mean(1))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * frames.var(1))
    assert bn.num_batches_tracked == 1 and not bn.update_sums.any()


@pytest.mark.parametrize("counted", [None, [1, 0, 1, 1, 0]], ids=["all_rows", "masked_rows"])
def test_batchnorm_gradient_is_that_of_its_statistics(counted):
    """Training BatchNorm's written-out backward (tc.model._Normalise) against finite differences and
    against autograd through the formula: rows left out of the statistics are normalised with them
    and get gradients, but do not move them."""
    torch.manual_seed(0)
    valid = None if counted is None else torch.tensor(counted, dtype=torch.bool)
    x = (torch.randn(5, 3, 2, 2, dtype=torch.float64) * 2 + 1).requires_grad_()
    weight = torch.empty(3, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def batchnorm(x, weight, bias):
        bn = BatchNorm2d(3).double()
        del bn.weight, bn.bias
        bn.weight, bn.bias = weight, bias
        return bn(x, valid)

    assert torch.autograd.gradcheck(batchnorm, (x, weight, bias))
    rows = x if valid is None else x[valid]
    mean, var = rows.mean((0, 2, 3))[:, None, None], rows.var((0, 2, 3), unbiased=False)[:, None, None]
    formula = (x - mean) * torch.rsqrt(var + 1e-5) * weight[:, None, None] + bias[:, None, None]
    dy = torch.randn_like(x)
    for got, want in zip(torch.autograd.grad(batchnorm(x, weight, bias), (x, weight, bias), dy),
                         torch.autograd.grad(formula, (x, weight, bias), dy)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batchnorm_statistics_paths_agree():
    """BatchNorm's three ways to its statistics, on float32 frames whose mean is 100 times their spread
    (where E[x^2] - E[x]^2 in float32 would lose the variance): one process with every row (var_mean),
    one process with a mask of rows (weighted float32), and the data-parallel float64 sums (here with an
    all-reduce over one rank), each with all rows and with rows left out."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4) + 100
    dy = torch.randn_like(x)

    def run(valid, all_reduce):
        torch.manual_seed(1)
        bn = BatchNorm2d(3)
        bn.weight.data.uniform_(0.5, 1.5)
        if all_reduce:
            bn.all_reduce = lambda t: t
        xi = x.clone().requires_grad_()
        y = bn(xi, valid)
        y.backward(dy)
        bn.fold()
        return y, xi.grad, bn.weight.grad, bn.bias.grad, bn.update_sums, bn.weight.detach()

    every, rows = torch.ones(6, dtype=torch.bool), torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    for want, *others in ([run(None, True), run(None, False), run(every, False)], [run(rows, True), run(rows, False)]):
        for got in others:
            for g, w, tol in zip(got, want, (1e-5, 1e-4, 1e-4, 1e-5, 1e-6)):
                torch.testing.assert_close(g, w, rtol=tol, atol=tol * 10)
    # and the float32 paths against float64 maths: the output's variance is weight^2 var / (var + eps)
    y, *_, weight = run(None, False)
    var = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(y.detach().double().var((0, 2, 3), unbiased=False), weight.double() ** 2 * var / (var + 1e-5),
                               rtol=1e-4, atol=0)


def test_batchnorm_under_bfloat16_keeps_the_dtypes():
    bn = BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    y = bn(x)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert bn.weight.grad.dtype == bn.bias.grad.dtype == torch.float32
    assert torch.isfinite(x.grad.float()).all() and x.grad.float().abs().sum() > 0


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

    taped, outs, (h, c) = TapedLSTMCell(cell), [], (h0, c0)
    for n, x_n in per_step(sizes, x):
        h, c = taped(x_n, h[:n], c[:n])
        outs.append(h)
    got = grads(torch.cat(outs), h)
    ref_out, hh, cc, start = [], h0, c0, 0
    for n in sizes:
        hh, cc = cell(x[start : start + n], (hh[:n], cc[:n]))
        ref_out.append(hh)
        start += n
    torch.testing.assert_close(torch.cat(outs), torch.cat(ref_out))
    for a, b in zip(got, grads(torch.cat(ref_out), hh)):
        torch.testing.assert_close(a, b)


def test_taped_linear_of_several_layers_is_them_side_by_side_with_gradients():
    """One matmul for layers sharing an input, called at every step of a shrinking set: each layer's
    output in its place, and the gradients of plain calls."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, k) for k in (3, 4, 2)]
    x = torch.randn(6, 5, requires_grad=True)
    sizes = [3, 2, 1]
    tangent = torch.randn(6, 9)

    def grads(out):
        (out * tangent).sum().backward()
        g = [p.grad.clone() for m in layers for p in m.parameters()] + [x.grad.clone()]
        for p in [*(p for m in layers for p in m.parameters()), x]:
            p.grad = None
        return g

    taped = TapedLinear(*layers)
    got = torch.cat([taped(x_n) for _, x_n in per_step(sizes, x)])
    got_grads = grads(got)
    ref = torch.cat([torch.cat([m(x_n) for m in layers], 1) for _, x_n in per_step(sizes, x)])
    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, grads(ref)):
        torch.testing.assert_close(a, b)


def test_film_pool_modulates_each_block_by_its_own_maps():
    """The four FiLM maps in one matmul give each block its own gamma and beta (the paper's FiLM)."""
    torch.manual_seed(0)
    films = torch.nn.ModuleList(FiLMBlock(4, 6) for _ in range(2))
    x, cond = torch.randn(5, 4, 7, 7), torch.randn(5, 6)
    got = film_pool(films, film_modulation(films, tape=True), x, cond, films[0].features(x))
    out = x
    for film in films:
        modulated = film.features(out) * film.gamma(cond)[:, :, None, None] + film.beta(cond)[:, :, None, None]
        out = F.relu(film.bn2(modulated)) + out
    torch.testing.assert_close(got, out.amax((2, 3)))


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
    ckpt["format_version"] = 1
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt has checkpoint format version 1.*delete it and train again"):
        load_agent(tmp_path / "old.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable agent checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt is not an agent checkpoint"):
        load_agent(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_agent(tmp_path / "missing.pt")


def test_taped_lstm_under_autocast_casts_each_weight_once_per_pass():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(5, 7)
    x, steps = torch.randn(12, 5, requires_grad=True), [3] * 4
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            taped, (h, c) = TapedLSTMCell(cell), (torch.zeros(3, 7), torch.zeros(3, 7))
            for n, x_n in per_step(steps, x):
                h, c = taped(x_n, h, c)
    # copies of weight_hh (or of its transpose, which autocast cannot cache): once for the 4 steps,
    # where casting inside each step's matmul made 4
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
             and list(e.input_shapes[0]) in ([28, 7], [7, 28])]  # fmt: skip
    assert len(casts) == 1 and h.dtype == torch.float32
    h.sum().backward()
    assert cell.weight_hh.grad.dtype == torch.float32
    ref = torch.nn.LSTMCell(5, 7)
    ref.load_state_dict(cell.state_dict())
    hr, cr = torch.zeros(3, 7), torch.zeros(3, 7)
    for x_n in x.detach().split(steps):
        hr, cr = ref(x_n, (hr, cr))
    hr.sum().backward()
    torch.testing.assert_close(cell.weight_hh.grad, ref.weight_hh.grad, rtol=0.05, atol=0.02)  # bfloat16 vs fp32


def test_bfloat16_autocast_training_is_close_to_fp32(tmp_path):
    # the AMP path of run_batch on the CPU (the CUDA twin is tests/test_cuda.py)
    generate_demos("BabyAI-GoToLocal-v0", 0, 6, tmp_path / "d", noise_rate=0.0, progress=False)
    demos = load_demos(tmp_path / "d")
    model = ModelConfig(image_dim=16, memory_dim=32, instr_dim=16, dropout=0.0, attn_dropout=0.0)

    def run(amp):
        torch.manual_seed(0)
        agent = Agent(model).train()
        cfg = TrainConfig(batch_size=6, recurrence=5, device="cpu", amp=amp)
        sums = run_batch(agent, make_batch(demos, np.arange(6), torch.device("cpu")), cfg, True, amp,
                         loss_scale(demos, cfg))  # fmt: skip
        return sums, torch.cat([p.grad.flatten() for p in agent.parameters() if p.grad is not None])

    (fp32, g32), (bf16, g16) = run(False), run(True)
    assert bf16["thought_nll"] == pytest.approx(fp32["thought_nll"], rel=0.02) and g16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
