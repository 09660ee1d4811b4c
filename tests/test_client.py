"""End to end, as client code uses it: a character model (embedding ->
2-layer bidirectional RNN with dropout -> linear -> cross-entropy over packed
sequences, gradient clipping, Adam) trained with rnnkern.RNN in place of
torch.nn.RNN follows nn.RNN's training run step for step."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkern


class CharModel(nn.Module):
    def __init__(self, rnn_cls, vocab=29, emb=12, hidden=23):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = rnn_cls(emb, hidden, num_layers=2, batch_first=True, dropout=0.2,
                           bidirectional=True, dtype=torch.float64)
        self.head = nn.Linear(2 * hidden, vocab, dtype=torch.float64)

    def forward(self, tokens, lengths):
        x = self.emb(tokens).double()                      # (B, T, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h_n = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.head(out), h_n                         # (B, T, V)


def test_training_run_matches_nn_rnn():
    torch.manual_seed(0)
    ref = CharModel(nn.RNN)
    ours = CharModel(rnnkern.RNN)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        B, T = 7, 19
        tokens = torch.randint(0, 29, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        target = torch.randint(0, 29, (B, T), generator=g)
        target[torch.arange(T)[None, :] >= lengths[:, None]] = -100  # padding ignored
        losses = {}
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            torch.manual_seed(100 + step)  # the same dropout masks for both
            logits, _ = model(tokens, lengths)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 29), target.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[model is ours] = loss.item()
        assert losses[True] == pytest.approx(losses[False], rel=1e-9), step
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), name
