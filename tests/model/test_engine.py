"""The generation engine against independent references: full forwards of the model over the whole sequence
(logits, greedy continuations, exact sampling distributions by enumeration) and fresh prefills (states).

fp64 models where exact token equality is asserted, so that no argmax can flip on rounding between paths."""

import itertools

import pytest
import torch

from latentforge.kernels import ssd_verify as ssd_verify_module
from latentforge.model import HybridModel, ModelConfig
from latentforge.model.engine import Engine, EngineConfig, SamplingParams
from latentforge.model.engine.runner import ModelRunner
from latentforge.model.engine.state import SlotStates
from tests.model.test_engine_sampling import _single_thread, chi_square_p_value, naive_probs  # noqa: F401


def make_model(dtype=torch.float64, seed=0, **overrides):
    base = dict(
        pattern="M*E-M",
        hidden_size=32,
        vocab_size=97,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_groups=2,
        ssm_state_size=8,
        chunk_size=8,
        num_experts=6,
        top_k=2,
        moe_intermediate_size=16,
        moe_latent_size=16,
        shared_expert_intermediate_size=24,
        mlp_intermediate_size=40,
        mtp_depths=2,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    return HybridModel(ModelConfig(**base)).to(dtype).eval()


@torch.no_grad()
def reference_greedy(model, prompt, max_new, stop=()):
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt) :]


PROMPTS = [[5, 17, 3, 88, 41], [9], [60, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [44, 44, 44, 7, 19, 23, 70]]
MAX_NEW = [9, 12, 7, 10, 14]


@pytest.fixture(scope="module")
def fp64_model():
    return make_model()


@pytest.fixture(scope="module")
def greedy_references(fp64_model):
    return [reference_greedy(fp64_model, p, n) for p, n in zip(PROMPTS, MAX_NEW)]


# ----- layers ----------------------------------------------------------------------------------------------------
def test_mixer_decode_state_keeps_the_chunked_scans_state_after_every_token(fp64_model):
    """The Mamba mixer's own forward with a decode state (recurrent path): outputs continue the chunked scan's,
    the states after every token equal the chunked scan's final states, and "advance" ends in the last of them."""
    mixer = fp64_model.backbone.layers[0].mixer
    x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    conv_dim = mixer.conv1d.weight.shape[0]
    state = {
        "conv": torch.zeros(2, conv_dim, 3, dtype=torch.float64),
        "ssm": torch.zeros(2, 4, 8, 8, dtype=torch.float64),
    }
    with torch.no_grad():
        full = mixer(x)
        head = mixer(x[:, :6], state=state)
        verify = {**state, "recurrent": True, "keep_per_token": True}
        tail = mixer(x[:, 6:], state=verify)
        assert verify["conv"] is state["conv"] and verify["ssm"] is state["ssm"]  # untouched until a row commits
        torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-9, atol=1e-9)
        for t in range(7):  # the state after token 6+t equals the chunked scan's final state over 7+t tokens
            fresh = {"conv": torch.zeros_like(state["conv"]), "ssm": torch.zeros_like(state["ssm"])}
            mixer(x[:, : 7 + t], state=fresh)
            torch.testing.assert_close(verify["conv_per_token"][:, t], fresh["conv"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(verify["ssm_per_token"].all()[:, t], fresh["ssm"], rtol=1e-7, atol=1e-9)
        advance = {**state, "recurrent": True}
        # verify (kernels/ssd_verify: closed form) and advance (the token loop) are two formulations: fp64 rounding
        torch.testing.assert_close(mixer(x[:, 6:], state=advance), tail, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(advance["conv"], fresh["conv"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(advance["ssm"], fresh["ssm"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_moe_module_without_gradient_equals_its_training_path(fp64_model, monkeypatch, path):
    """What the engine's steps run: LatentMoE's own forward, whose experts take a few-token path without gradient
    (kernels/moe.py), equal to the grouped path training runs."""
    import latentforge.kernels.moe as kernels_moe

    if path == "gather":
        monkeypatch.setattr(kernels_moe, "DENSE_EXPERTS_MAX_MACS", 0)
    moe = fp64_model.backbone.layers[2].mixer
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    taken = []
    monkeypatch.setattr(
        kernels_moe,
        f"moe_experts_{'dense' if path == 'dense' else 'gathered'}",
        lambda *a, _f=getattr(kernels_moe, f"moe_experts_{'dense' if path == 'dense' else 'gathered'}"): (
            taken.append(path) or _f(*a)
        ),
    )
    with torch.no_grad():
        fast, _ = moe(x)
    with torch.enable_grad():
        moe.experts.up_proj.requires_grad_(True)
        trained, _ = moe(x)
    assert taken == [path]
    torch.testing.assert_close(fast, trained.detach(), rtol=1e-12, atol=1e-12)


# ----- exactness of decoding ---------------------------------------------------------------------------------------
def test_cached_prefill_and_decode_steps_equal_one_full_forward():
    """The slot states of two rows: a prefill each, then one token per row per step (float32, no MTP)."""
    model = make_model(torch.float32, mtp_depths=0)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    runner = ModelRunner(model, SlotStates(model, 2, 32))
    with torch.no_grad():
        full = model(ids).logits
        steps = [torch.cat([runner.prefill(row, ids[row : row + 1, :11])[0][:, None] for row in range(2)])]
        for t in range(11, 19):
            pos = torch.full((2,), t, dtype=torch.long)
            steps.append(runner.step(ids[:, t : t + 1], pos, t, keep_positions=False).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 10:], rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["closed form", "token loop"])
def verify_path(request, monkeypatch):
    """Both ways a verify step's SSM states are kept (kernels/ssd_verify.py picks by their size), forced."""
    monkeypatch.setattr(ssd_verify_module, "CLOSED_FORM_MIN_ELEMENTS", 0 if request.param == "closed form" else 1 << 62)


def test_rows_prefilled_together_continue_like_rows_prefilled_alone(fp64_model, verify_path):
    """prefill_rows (right-padded rows of different lengths through the decode path, one forward) leaves each row
    the states, last-token logits and hidden of a prefill of that row alone (the chunked scan): the next steps
    agree too, and the pads' keys beyond a row's length change nothing."""
    prompts = [PROMPTS[3], PROMPTS[1], PROMPTS[4]]
    together = ModelRunner(fp64_model, SlotStates(fp64_model, 3, 32))
    alone = ModelRunner(fp64_model, SlotStates(fp64_model, 3, 32))
    with torch.no_grad():
        logits, hidden, _ = together.prefill_rows(0, prompts)
        for row, prompt in enumerate(prompts):
            row_logits, row_hidden = alone.prefill(row, torch.tensor([prompt]))
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(hidden[row, : len(prompt)], row_hidden[0], rtol=1e-9, atol=1e-9)
        pos = torch.tensor([len(p) for p in prompts])
        ids = torch.tensor([[7, 8], [9, 10], [11, 12]])
        next_together = together.step(ids, pos, int(pos.max()), keep_positions=False).logits
        next_alone = alone.step(ids, pos, int(pos.max()), keep_positions=False).logits
    torch.testing.assert_close(next_together, next_alone, rtol=1e-9, atol=1e-9)


def test_every_engine_forward_is_the_models_own(fp64_model, greedy_references):
    """No layer is re-implemented in the engine: each prefill, decode / verify step and drafting depth is one call
    of HybridModel.forward / MTPBlock.forward, and every Mamba layer runs its mixer's forward."""
    calls = {"model": 0, "mtp": 0, "mamba": 0}

    def count(name):
        return lambda module, args, output: calls.__setitem__(name, calls[name] + 1)

    handles = [
        fp64_model.register_forward_hook(count("model")),
        fp64_model.mtp.register_forward_hook(count("mtp")),
        fp64_model.backbone.layers[0].mixer.register_forward_hook(count("mamba")),
    ]
    try:
        engine = Engine(fp64_model, EngineConfig(max_batch=2, max_seq_len=40, draft_tokens=2))
        catch_up, catch_ups = engine.drafter.catch_up, []
        engine.drafter.catch_up = lambda *args: catch_ups.append(1) or catch_up(*args)
        prefills = []
        for name in ("prefill", "prefill_rows"):  # one row alone / the rows joining in one step together
            method = getattr(engine.runner, name)
            setattr(engine.runner, name, lambda *args, method=method: prefills.append(1) or method(*args))
        results = engine.generate(PROMPTS[:3], [SamplingParams(temperature=0, max_new_tokens=n) for n in MAX_NEW[:3]])
    finally:
        for handle in handles:
            handle.remove()
    assert [r.token_ids for r in results] == greedy_references[:3]
    assert len(prefills) == 2  # the first two prompts join together: one prefill forward; the third alone
    forwards = len(prefills) + engine.stats.steps  # one forward per prefill, one verify per step
    assert calls["model"] == forwards and calls["mamba"] == forwards
    assert calls["mtp"] == 2 * len(catch_ups) > 0  # each catch-up: one MTP call per drafting depth


@pytest.mark.parametrize("draft_tokens", [0, 3])
def test_token_by_token_logits_equal_one_full_forward(draft_tokens):
    """Prefill + decode (or verify) steps give the logits one forward over the whole sequence gives (float32)."""
    model = make_model(torch.float32)
    engine = Engine(model, EngineConfig(max_batch=2, max_seq_len=40, draft_tokens=draft_tokens))
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 1.0, max_new_tokens=n, seed=i, return_logits=True)
        for i, n in enumerate(MAX_NEW)
    ]
    results = engine.generate(PROMPTS, params)
    with torch.no_grad():
        for prompt, result in zip(PROMPTS, results):
            sequence = prompt + result.token_ids
            full = model(torch.tensor([sequence[:-1]])).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(result.logits, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("draft_tokens,max_batch", [(0, 2), (1, 5), (2, 1), (3, 3), (4, 8)])
def test_greedy_drafting_gives_the_tokens_of_greedy_decoding(
    fp64_model, greedy_references, draft_tokens, max_batch, verify_path
):
    """Across batch sizes and while sequences join and leave (5 requests, fewer slots, different lengths);
    depth 4 is beyond the trained depth (2). Prompts of 1 and 2 tokens are shorter than the deeper drafts."""
    engine = Engine(fp64_model, EngineConfig(max_batch=max_batch, max_seq_len=40, draft_tokens=draft_tokens))
    results = engine.generate(PROMPTS, [SamplingParams(temperature=0, max_new_tokens=n) for n in MAX_NEW])
    assert [r.token_ids for r in results] == greedy_references
    assert all(r.finish_reason == "length" for r in results)


def test_stop_tokens_end_a_sequence_inside_an_accepted_draft(fp64_model, greedy_references):
    stop = {greedy_references[0][4], greedy_references[3][2]}
    engine = Engine(fp64_model, EngineConfig(max_batch=3, max_seq_len=40, draft_tokens=3))
    results = engine.generate(
        PROMPTS, [SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=stop) for n in MAX_NEW]
    )
    for prompt, n, result in zip(PROMPTS, MAX_NEW, results):
        expected = reference_greedy(fp64_model, prompt, n, stop)
        assert result.token_ids == expected
        assert result.finish_reason == ("stop" if expected[-1] in stop else "length")


class OracleDrafts:
    """Replaces the MTP drafts by the true greedy continuation with random corruptions, so that every acceptance
    length 0..k occurs; records the acceptance lengths seen."""

    def __init__(self, engine, references, seed=0):
        self.engine, self.references = engine, references
        self.rng = torch.Generator().manual_seed(seed)
        original = engine.drafter.catch_up

        def catch_up(lo, sequences, new_processed, trunk_hidden, sampler):
            original(lo, sequences, new_processed, trunk_hidden, sampler)
            k = engine.drafter.depths
            for i, sequence in enumerate(sequences):
                request = engine.running[lo + i]
                truth = self.references[tuple(request.result.prompt_ids)] + [0] * (k + 1)
                start = len(sequence) - len(request.result.prompt_ids)
                drafts = truth[start : start + k]
                for j in range(k):
                    if torch.rand(1, generator=self.rng).item() < 0.25:
                        drafts[j] = (drafts[j] + 1) % engine.vocab_size
                engine.drafter.drafts[lo + i] = torch.tensor(drafts)

        engine.drafter.catch_up = catch_up


def test_rollback_after_partial_acceptance_leaves_no_stale_state(fp64_model, greedy_references):
    """Drafts right up to a random depth: the output stays exactly greedy, and after every step each running row's
    Mamba, conv and KV states equal those of a fresh prefill of the tokens it has consumed."""
    k = 3
    engine = Engine(fp64_model, EngineConfig(max_batch=3, max_seq_len=40, draft_tokens=k))
    OracleDrafts(engine, {tuple(p): r for p, r in zip(PROMPTS, greedy_references)})
    fresh = SlotStates(fp64_model, 1, engine.states.capacity)
    fresh_runner = ModelRunner(fp64_model, fresh)
    for prompt, n in zip(PROMPTS, MAX_NEW):
        engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=n))
    results, lengths_seen = {}, []
    accepted_before = [0] * k
    while engine.has_unfinished():
        for result in engine.step():
            results[result.request_id] = result.token_ids
        lengths_seen.append([a - b for a, b in zip(engine.stats.accepted, accepted_before)])
        accepted_before = list(engine.stats.accepted)
        for row, request in enumerate(engine.running):
            fresh_runner.prefill(0, torch.tensor([request.sequence[: request.processed]]))
            for kind, mine, ref in zip(engine.states.kinds, engine.states.layers, fresh.layers):
                if kind == "mamba":
                    torch.testing.assert_close(mine["conv"][row], ref["conv"][0], rtol=1e-7, atol=1e-9)
                    torch.testing.assert_close(mine["ssm"][row], ref["ssm"][0], rtol=1e-7, atol=1e-9)
                elif kind == "attention":
                    length = request.processed
                    torch.testing.assert_close(mine["k"][row, :, :length], ref["k"][0, :, :length])
                    torch.testing.assert_close(mine["v"][row, :, :length], ref["v"][0, :, :length])
    assert [results[i] for i in range(len(PROMPTS))] == greedy_references
    histogram = engine.stats.accepted
    assert engine.stats.drafted[0] > histogram[0] > histogram[1] > histogram[2] > 0  # every depth accepted, not all


def test_mtp_drafts_follow_the_training_formulation(fp64_model):
    """The drafter's depth-j hidden over a sequence equals the model's MTP chain (as in its training loss), so
    depth j drafts what MTP depth j was trained to predict; checked through the greedy draft of each depth."""
    prompt = [5, 17, 3, 88, 41, 9, 60]
    engine = Engine(fp64_model, EngineConfig(max_batch=1, max_seq_len=40, draft_tokens=3))
    engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=20))
    for _ in range(3):
        engine.step()
    request = engine.running[0]
    sequence, p = request.sequence, request.processed  # sequence[p] is the chosen, unconsumed token
    drafts = engine.drafter.drafts[0].tolist()
    with torch.no_grad():
        known = torch.tensor([sequence[: p + 1]])
        hidden = fp64_model(known[:, :-1]).hidden  # trunk over positions 0..p-1
        tokens = sequence[: p + 1]
        for depth in range(1, 4):
            shifted = torch.tensor([tokens[depth : depth + p]])  # position s reads token s+depth
            hidden, _ = fp64_model.mtp(fp64_model.backbone.embeddings(shifted), hidden)
            draft = int(fp64_model.lm_head(hidden[0, -1]).argmax())
            assert draft == drafts[depth - 1], f"depth {depth}"
            tokens = tokens + [draft]


# ----- sampling with drafting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_sampled_tokens_follow_the_model_distribution_with_and_without_drafting(top_k, top_p):
    """Temperature 1 on an 8-token vocabulary: the joint law of 4 sampled tokens is enumerated exactly from full
    forwards; the sample frequencies (marginals per position, pairs of neighbours) must fit it, with drafting
    (which accepts and rejects at every depth here) as without."""
    vocab, new = 8, 4
    model = make_model(torch.float64, seed=3, vocab_size=vocab, init_std=0.3)
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        continuations = torch.tensor(list(itertools.product(range(vocab), repeat=new)))
        ids = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations[:, :-1]], 1)
        logits = model(ids).logits[:, len(prompt) - 1 :]
        joint = torch.ones(len(continuations), dtype=torch.float64)
        cache = {}
        for row in range(len(continuations)):
            for j in range(new):
                key = tuple(continuations[row, :j].tolist())
                if key not in cache:
                    cache[key] = naive_probs(logits[row, j], 1.0, top_k, top_p)
                joint[row] *= cache[key][continuations[row, j]]
    n = 2500
    for draft_tokens in (0, 2):
        engine = Engine(model, EngineConfig(max_batch=64, max_seq_len=16, draft_tokens=draft_tokens))
        results = engine.generate(
            [prompt] * n, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=new, seed=None)
        )
        samples = torch.tensor([r.token_ids for r in results])
        for j in range(new):
            marginal = torch.zeros(vocab, dtype=torch.float64).index_add_(0, continuations[:, j], joint)
            counts = torch.bincount(samples[:, j], minlength=vocab)
            assert chi_square_p_value(counts, marginal) > 1e-3, (draft_tokens, j)
        for j in range(new - 1):
            pair_index = continuations[:, j] * vocab + continuations[:, j + 1]
            pair = torch.zeros(vocab * vocab, dtype=torch.float64).index_add_(0, pair_index, joint)
            counts = torch.bincount(samples[:, j] * vocab + samples[:, j + 1], minlength=vocab * vocab)
            assert chi_square_p_value(counts, pair) > 1e-3, (draft_tokens, j, "pair")
        # each logprob is that of the sampled token under its sampling distribution
        first = results[0]
        key_probs = naive_probs(logits[0, 0], 1.0, top_k, top_p)  # row 0's prompt-only position
        # the engine reports log-probs in fp32 (the model here is fp64): compare at fp32 precision
        want = float(torch.log(key_probs[first.token_ids[0]]))
        assert first.logprobs[0] == pytest.approx(want, rel=4 * torch.finfo(torch.float32).eps, abs=1e-7)
        if draft_tokens:
            accepted, drafted = engine.stats.accepted, engine.stats.drafted
            assert 0 < accepted[1] < accepted[0] < drafted[0]  # acceptance and rejection at both depths


def test_seeded_requests_do_not_depend_on_the_batch(fp64_model):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, seed=1234)
    alone = Engine(fp64_model, EngineConfig(max_batch=1, max_seq_len=40)).generate([PROMPTS[4]], params)[0]
    others = [SamplingParams(temperature=1.0, max_new_tokens=6, seed=i) for i in range(4)]
    crowd = Engine(fp64_model, EngineConfig(max_batch=3, max_seq_len=40)).generate(PROMPTS, others + [params])
    assert crowd[-1].token_ids == alone.token_ids


# ----- weight updates in flight -----------------------------------------------------------------------------------
@torch.no_grad()
def last_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_weight_update_between_steps_recompute(draft_tokens):
    """Running sequences survive the update; later tokens carry the new version; with recompute every later
    logit is the new weights' own, in particular the next one equals a fresh engine's on the new weights."""
    model, new_model = make_model(seed=0), make_model(seed=1)
    engine = Engine(
        model,
        EngineConfig(max_batch=4, max_seq_len=40, draft_tokens=draft_tokens, weight_update_policy="recompute"),
        version=0,
    )
    for prompt in PROMPTS[:3]:
        engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=12, return_logits=True))
    done = {}
    for _ in range(3):
        done.update({r.request_id: r for r in engine.step()})
    emitted_before = {r.result.request_id: len(r.result.token_ids) for r in engine.running}
    assert len(emitted_before) == 3 and not done
    engine.update_weights(new_model.state_dict(), version=7)
    while engine.has_unfinished():
        done.update({r.request_id: r for r in engine.step()})
    fresh = Engine(make_model(seed=1), EngineConfig(max_batch=1, max_seq_len=40))
    for rid, prompt in enumerate(PROMPTS[:3]):
        result, cut = done[rid], emitted_before[rid]
        assert len(result.token_ids) == 12 and result.finish_reason == "length"
        assert result.versions == [0] * cut + [7] * (12 - cut)
        context = prompt + result.token_ids[:cut]
        next_logits = fresh.generate([context], SamplingParams(temperature=0, max_new_tokens=1, return_logits=True))[
            0
        ].logits[0]
        torch.testing.assert_close(result.logits[cut], next_logits, rtol=1e-9, atol=1e-9)
        for j in range(cut, 12):
            torch.testing.assert_close(
                result.logits[j], last_logits(new_model, prompt + result.token_ids[:j]), rtol=1e-8, atol=1e-8
            )


def test_weight_update_continue_keeps_old_caches():
    model, new_model = make_model(seed=0), make_model(seed=1)
    engine = Engine(model, EngineConfig(max_batch=2, max_seq_len=40, draft_tokens=2), version=0)
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=8, return_logits=True))
    engine.step()
    engine.step()
    cut = len(engine.running[0].result.token_ids)
    engine.update_weights(new_model.state_dict(), version=1, policy="continue")
    result = None
    while engine.has_unfinished():
        finished = engine.step()
        if finished:
            result = finished[0]
    assert result.versions == [0] * cut + [1] * (8 - cut)
    stale = last_logits(new_model, PROMPTS[0] + result.token_ids[:cut])
    assert not torch.allclose(result.logits[cut], stale, atol=1e-3)  # the context was encoded by the old weights


def test_prefix_reuse_is_keyed_by_weight_version():
    model, new_model = make_model(seed=0), make_model(seed=1)
    engine = Engine(model, EngineConfig(max_batch=2, max_seq_len=40, prefix_cache_size=4))
    greedy = SamplingParams(temperature=0, max_new_tokens=3, return_logits=True)
    first = engine.generate([PROMPTS[3]], greedy)[0]
    again = engine.generate([PROMPTS[3]], greedy)[0]
    assert engine.stats.prefix_hits == 1 and again.token_ids == first.token_ids
    torch.testing.assert_close(again.logits, first.logits)
    engine.update_weights(new_model.state_dict(), version=1)
    after = engine.generate([PROMPTS[3]], greedy)[0]
    assert engine.stats.prefix_hits == 1  # the cached prefill of version 0 is not served
    torch.testing.assert_close(after.logits[0], last_logits(new_model, PROMPTS[3]), rtol=1e-9, atol=1e-9)
    assert after.versions == [1, 1, 1]


def test_update_weights_rejects_bad_tensors():
    model = make_model(seed=0)
    engine = Engine(model, EngineConfig(max_batch=1, max_seq_len=20))
    state = make_model(seed=1).state_dict()
    with pytest.raises(KeyError, match="unknown tensor names"):
        engine.update_weights({**state, "backbone.nope.weight": torch.zeros(1)}, version=1)
    with pytest.raises(KeyError, match="partial=True"):
        engine.update_weights({"lm_head.weight": state["lm_head.weight"]}, version=1)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({**state, "lm_head.weight": torch.zeros(3, 3)}, version=1)
    assert engine.version == 0 and not torch.equal(model.lm_head.weight, state["lm_head.weight"])
    engine.update_weights({"lm_head.weight": state["lm_head.weight"]}, version=2, partial=True)
    assert engine.version == 2 and torch.equal(model.lm_head.weight, state["lm_head.weight"])


# ----- requests ----------------------------------------------------------------------------------------------------
def test_bad_requests_and_configs_are_named(fp64_model):
    engine = Engine(fp64_model, EngineConfig(max_batch=1, max_seq_len=10))
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add_request([1] * 8, SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 97], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="MTP"):
        Engine(make_model(mtp_depths=0), EngineConfig(draft_tokens=2))


def test_abort_frees_the_slot_and_others_carry_on(fp64_model, greedy_references):
    engine = Engine(fp64_model, EngineConfig(max_batch=2, max_seq_len=40, draft_tokens=2))
    for prompt, n in zip(PROMPTS[:3], MAX_NEW[:3]):
        engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=n))
    engine.step()
    assert engine.abort(0) and not engine.abort("missing")
    results = {}
    while engine.has_unfinished():
        results.update({r.request_id: r for r in engine.step()})
    assert results[0].finish_reason == "abort"
    assert results[1].token_ids == greedy_references[1] and results[2].token_ids == greedy_references[2]
