"""The loss module (train/loss.py) against independent formulations: MTP losses by truncation and plain
F.cross_entropy, the balance loss by its definition, expert loads, padding, routing replay through the forward,
and the model forward of a pipeline part."""

import copy

import pytest
import torch
import torch.nn.functional as F

from latentforge.model import HybridModel
from latentforge.model.mtp import mtp_recursion
from latentforge.train.loss import Normalizers, TokenPiece, balance_partial, model_loss

from tests.model.test_model import small

from .loss_reference import reference_loss


def test_mtp_losses_follow_the_spec():
    torch.manual_seed(0)
    cfg = small()
    model = HybridModel(cfg)
    ids = torch.randint(0, 97, (2, 20))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    out = model_loss(model, inputs, labels)
    # independent re-derivation of depth 1 by truncation (the loss pads instead) and plain F.cross_entropy
    with torch.no_grad():
        h = model(inputs).hidden
        layer0, layer1 = model.mtp.layers
        e = model.backbone.embeddings(inputs[:, 1:])
        u = layer0.eh_proj(torch.cat([layer0.enorm(e), layer0.hnorm(h[:, :-1])], -1))
        u = u + layer0.mixer(layer0.norm(u))
        u = layer1.final_layernorm(u + layer1.mixer(layer1.norm(u))[0])
        depth1 = F.cross_entropy(model.lm_head(u).reshape(-1, 97), labels[:, 1:].reshape(-1))
    assert out.mtp_losses[0].item() == pytest.approx(depth1.item(), rel=1e-5)
    lm_ref = F.cross_entropy(model(inputs).logits.reshape(-1, 97), labels.reshape(-1))
    assert out.lm_loss.item() == pytest.approx(lm_ref.item(), rel=1e-5)
    expected = out.lm_loss + 0.3 / 2 * (out.mtp_losses[0] + out.mtp_losses[1]) + 1e-4 * out.aux_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mtp_depth_two_reads_depth_one_output():
    """Depth 2 must chain on depth 1's hidden state (shared block), not restart from the trunk."""
    torch.manual_seed(0)
    model = HybridModel(small())
    ids = torch.randint(0, 97, (1, 16))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        losses = model_loss(model, inputs, labels).mtp_losses
        h = model(inputs).hidden
        shifted = lambda t, k, fill: torch.cat([t[:, k:], torch.full_like(t[:, :k], fill)], 1)  # noqa: E731
        h1, _ = model.mtp(model.backbone.embeddings(shifted(inputs, 1, 0)), h)
        h2, _ = model.mtp(model.backbone.embeddings(shifted(inputs, 2, 0)), h1)
        ref = F.cross_entropy(model.lm_head(h2).reshape(-1, 97), shifted(labels, 2, -100).reshape(-1))
        recursion = [d for d, _ in mtp_recursion(model.mtp, model.mtp_embeddings(inputs), h)]
    assert losses[1].item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(recursion[1], h2)


def test_sequence_balance_loss_against_a_loop():
    torch.manual_seed(0)
    batch, seq, experts, k = 3, 7, 5, 2
    scores = torch.rand(batch * seq, experts)
    idx = torch.topk(torch.rand(batch * seq, experts), k, dim=-1).indices
    total = 0.0
    for b in range(batch):
        rows = range(b * seq, (b + 1) * seq)
        for e in range(experts):
            f = experts / (k * seq) * sum(int(e in idx[t].tolist()) for t in rows)
            p = sum(scores[t, e].item() / scores[t].sum().item() for t in rows) / seq
            total += f * p
    from latentforge.model.moe import Routing

    got = balance_partial(Routing(scores, idx, idx), TokenPiece(batch=batch, seq_len=seq))
    assert got.item() == pytest.approx(total, rel=1e-6)


def test_whole_model_loss_equals_the_plain_reference_with_gradients():
    torch.manual_seed(0)
    model = HybridModel(small())
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 97, (3, 17))
    seq_idx = torch.zeros(3, 16, dtype=torch.int32)
    seq_idx[1, 9:] = 1
    labels = ids[:, 1:].clone()
    labels[0, 3:6] = -100
    got = model_loss(model, ids[:, :-1], labels, seq_idx=seq_idx)
    want = reference_loss(plain, ids[:, :-1], labels, seq_idx=seq_idx)
    for name in ("loss", "lm_loss", "aux_loss"):
        assert getattr(got, name).item() == pytest.approx(getattr(want, name).item(), rel=1e-6), name
    assert [x.item() for x in got.mtp_losses] == pytest.approx([x.item() for x in want.mtp_losses], rel=1e-6)
    assert torch.equal(got.expert_load, want.expert_load)
    got.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)) < 1e-5, name


def test_expert_load_counts_every_token_choice():
    model = HybridModel(small())
    ids = torch.randint(0, 97, (2, 9))
    out = model_loss(model, ids[:, :-1], ids[:, 1:])
    # rows: the trunk MoE, then the MTP block's MoE summed over its 2 depths (each routes every token top-2)
    assert out.expert_load.shape == (2, 6)
    assert out.expert_load[0].sum() == 2 * 8 * 2
    assert out.expert_load[1].sum() == 2 * (2 * 8 * 2)


def test_aux_loss_counts_every_mtp_depth():
    torch.manual_seed(0)
    model = HybridModel(small())
    ids = torch.randint(0, 97, (2, 9))
    out = model_loss(model, ids[:, :-1], ids[:, 1:])
    with torch.no_grad():
        trunk = model(ids[:, :-1])
        piece = TokenPiece(batch=2, seq_len=8)
        trunk_aux = balance_partial(trunk.routing[0], piece).item() / 2
        mtp_aux = sum(
            balance_partial(r, piece).item() / 2
            for _, r in mtp_recursion(model.mtp, model.mtp_embeddings(ids[:, :-1]), trunk.hidden)
        )
    assert out.aux_loss.item() == pytest.approx(trunk_aux + mtp_aux, rel=1e-6)


def test_padding_counts_nowhere():
    """attention_mask 0 positions and all-padding rows change no loss term and no expert load."""
    torch.manual_seed(0)
    model = HybridModel(small(mtp_depths=0))
    ids = torch.randint(1, 97, (2, 12))
    plain = model_loss(model, ids[:, :-1], ids[:, 1:])
    padded_ids = torch.zeros(3, 15, dtype=torch.long)
    padded_ids[:2, :11] = ids[:, :-1]
    labels = torch.full((3, 15), -100)
    labels[:2, :11] = ids[:, 1:]
    mask = torch.zeros(3, 15, dtype=torch.bool)
    mask[:2, :11] = True
    padded = model_loss(model, padded_ids, labels, attention_mask=mask)
    for name in ("loss", "lm_loss", "aux_loss"):
        assert getattr(padded, name).item() == pytest.approx(getattr(plain, name).item(), rel=1e-5), name
    assert torch.equal(padded.expert_load, plain.expert_load)
    assert Normalizers.of_batch(labels, 0, mask).sequences == 2


def test_forward_replays_routes_and_reports_the_routers_own_choice():
    torch.manual_seed(0)
    model = HybridModel(small(pattern="ME*E"))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        own = model(ids)
        forced = torch.randint(0, 6, own.routes.shape)
        forced[..., 1] = (forced[..., 0] + 1) % 6  # two distinct experts per token
        replayed = model(ids, routes=forced)
    assert own.routes.shape == (2, 10, 2, 2)
    assert torch.equal(replayed.routes, forced)
    # the first layer's router sees the same input either way: its own choice is still reported (router agreement)
    assert torch.equal(replayed.routing[0].router_topk, own.routing[0].topk_idx)
    assert not torch.equal(replayed.routing[0].topk_idx, replayed.routing[0].router_topk)
    assert not torch.allclose(replayed.logits, own.logits)
    with pytest.raises(ValueError, match="replayed routes have shape"):
        model(ids, routes=forced[:, :9])


def test_a_pipeline_part_runs_its_own_layers():
    """split_model's parts chained through HybridModel.forward give the whole model's hidden state and routing."""
    from latentforge.train.parallel.stage import split_model

    torch.manual_seed(0)
    model = HybridModel(small(pattern="ME*EM"))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        whole = model(ids)
        first, second = split_model(model, [[0, 1, 2], [3, 4]], [0, 1])
        a = first(ids)
        b = second(hidden=a.hidden)
    assert a.logits is None and sorted(a.routing) == [0] and sorted(b.routing) == [1]
    torch.testing.assert_close(b.hidden, whole.hidden)
    torch.testing.assert_close(b.logits, whole.logits)
    assert torch.equal(b.routing[1].topk_idx, whole.routing[1].topk_idx)
    with pytest.raises(ValueError, match="no embedding"):
        second(ids)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = HybridModel(small())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(15):
        out = model_loss(model, ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0
