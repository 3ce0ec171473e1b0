"""Float64 loop implementations straight from the definitions: the independent ground truth the
references are tested against. Slow on purpose; use small shapes."""

from __future__ import annotations

import math

import torch


def ssd_naive(x, dt, A, B, C, D=None, seq_idx=None, initial_state=None, z=None):
    """Sequential recurrence h_t = exp(dt A) h + dt x B^T; y_t = h_t C_t + D x_t (float64)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    y = torch.zeros(b, l, h, p, dtype=torch.float64)
    final = torch.zeros(b, h, p, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            state = torch.zeros(p, n, dtype=torch.float64)
            if initial_state is not None:
                state = initial_state[bi, hi].double().clone()
            for t in range(l):
                if seq_idx is not None and t > 0 and seq_idx[bi, t] != seq_idx[bi, t - 1]:
                    state = torch.zeros(p, n, dtype=torch.float64)
                state = math.exp(dt[bi, t, hi] * A[hi]) * state + dt[bi, t, hi] * torch.outer(
                    x[bi, t, hi], B[bi, t, gi]
                )
                out = state @ C[bi, t, gi]
                if D is not None:
                    out = out + D[hi].double() * x[bi, t, hi]
                if z is not None:
                    zz = z[bi, t, hi].double()
                    out = out * zz * torch.sigmoid(zz)
                y[bi, t, hi] = out
            final[bi, hi] = state
    return y, final


def conv1d_naive(x, weight, bias=None, seq_idx=None, initial_state=None, activation="silu"):
    """y[t, c] = act(bias_c + sum_i w[c, i] * in[t - (k-1) + i]) with earlier documents as zeros."""
    x, weight = x.double(), weight.double()
    b, l, c = x.shape
    k = weight.shape[1]
    y = torch.zeros(b, l, c, dtype=torch.float64)
    final = torch.zeros(b, c, k - 1, dtype=torch.float64)

    def value(bi, s, ref_t):  # input at time s (negative: from initial_state) seen from token ref_t
        doc_s = seq_idx[bi, max(s, 0)] if seq_idx is not None else 0
        doc_t = seq_idx[bi, ref_t] if seq_idx is not None else 0
        if doc_s != doc_t:
            return torch.zeros(c, dtype=torch.float64)
        if s >= 0:
            return x[bi, s]
        if initial_state is None:
            return torch.zeros(c, dtype=torch.float64)
        return initial_state[bi, :, k - 1 + s].double()

    for bi in range(b):
        for t in range(l):
            acc = bias.double().clone() if bias is not None else torch.zeros(c, dtype=torch.float64)
            for i in range(k):
                acc = acc + weight[:, i] * value(bi, t - (k - 1) + i, t)
            y[bi, t] = acc * torch.sigmoid(acc) if activation == "silu" else acc
        for j in range(k - 1):
            final[bi, :, j] = value(bi, l - (k - 1) + j, l - 1)
    return y, final


def rms_norm_naive(x, weight, eps=1e-5):
    x = x.double()
    out = torch.empty_like(x)
    flat, oflat = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for i in range(flat.shape[0]):
        oflat[i] = weight.double() * flat[i] / math.sqrt(float((flat[i] ** 2).mean()) + eps)
    return out


def gated_rms_norm_naive(x, z, weight, group_size, eps=1e-5):
    x, z = x.double(), z.double()
    gated = x * z * torch.sigmoid(z)
    out = torch.empty_like(gated)
    d = x.shape[-1]
    flat, oflat = gated.reshape(-1, d), out.view(-1, d)
    for i in range(flat.shape[0]):
        for g0 in range(0, d, group_size):
            seg = flat[i, g0 : g0 + group_size]
            oflat[i, g0 : g0 + group_size] = seg / math.sqrt(float((seg**2).mean()) + eps)
    return out * weight.double()


def random_seq_idx(b, l, n_docs_max, generator):
    """Non-decreasing doc ids per row with ragged boundaries (some rows one document)."""
    rows = []
    for _ in range(b):
        n_cuts = int(torch.randint(0, n_docs_max, (1,), generator=generator))
        cuts = torch.randint(1, l, (n_cuts,), generator=generator) if l > 1 else torch.zeros(0, dtype=torch.long)
        ids = torch.zeros(l, dtype=torch.long)
        for cpos in cuts.tolist():
            ids[cpos:] += 1
        rows.append(ids)
    return torch.stack(rows).to(torch.int32)


def moe_naive(x, topk_idx, topk_weight, w_up, w_down):
    """y[t] = sum_j w[t,j] * down_e(relu(up_e x_t)^2), token by token in float64."""
    x, topk_weight, w_up, w_down = x.double(), topk_weight.double(), w_up.double(), w_down.double()
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[t, j])
            y[t] += topk_weight[t, j] * (w_down[e] @ torch.relu(w_up[e] @ x[t]) ** 2)
    return y


def cross_entropy_naive(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """Per-token -log softmax(hidden @ weight.T)[label] in float64 with an explicit max-shifted sum."""
    hidden, weight = hidden.double(), weight.double()
    losses = torch.zeros(hidden.shape[0], dtype=torch.float64)
    for i in range(hidden.shape[0]):
        if int(labels[i]) == ignore_index:
            continue
        logits = weight @ hidden[i]
        m = logits.max()
        losses[i] = m + torch.log(torch.exp(logits - m).sum()) - logits[int(labels[i])]
    if reduction == "none":
        return losses
    n_valid = int((labels != ignore_index).sum())
    return losses.sum() / max(n_valid, 1) if reduction == "mean" else losses.sum()


def uneven_routing(T, k, E, generator, empty_expert=0):
    """Top-k expert ids with a skewed load (expert 1 popular) and `empty_expert` never chosen."""
    probs = torch.ones(E, dtype=torch.float64)
    probs[1 % E] = 8.0
    probs[empty_expert] = 0.0
    idx = torch.stack([torch.multinomial(probs, k, replacement=False, generator=generator) for _ in range(T)])
    return idx
