import pytest
import torch

from encore_pl.data import EditRequest
from encore_pl.forward import Replay
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer, reduced_copy
from encore_pl.prompts import generate_context_prefixes
from encore_pl.reference import reference_target_vectors
from encore_pl.target_vectors import (
    MostProbableEarlyStopping,
    SuffixForward,
    TargetOptimization,
    compute_target_vectors,
    prefixed_targets_top1,
    step_model,
)

SUBJECTS = ["France", "Germany", "Japan", "Italy", "Spain", "Brazil"]
TARGETS = [" the", " of", " city", " capital", " is", " Paris"]  # the last is 3 tokens in the tiny vocab


def setup(model_dir):
    model, tok = load_model_and_tokenizer(str(model_dir))
    requests = [EditRequest(str(i), s, "The capital city of {}", t, " x") for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]
    return LocatedModel(model), tok, requests, generate_context_prefixes(model, tok, seed=0)


def test_batched_equals_one_request_at_a_time(tiny_model_dir):
    lm, tok, requests, prefixes = setup(tiny_model_dir)
    hp = TargetOptimization(v_lr=0.5, v_num_grad_steps=15, extra_steps=1, clamp_norm_factor=4.0)
    fast = compute_target_vectors(lm, tok, requests, prefixes, 2, hp)
    ref = reference_target_vectors(lm, tok, requests, prefixes, 2, hp)
    assert fast.steps.tolist() == ref.steps.tolist()
    assert len(set(fast.steps.tolist())) > 1, "requests should stop at different steps"
    assert fast.steps.min() < hp.v_num_grad_steps - 1, "MPES should stop some requests early"
    torch.testing.assert_close(fast.h, ref.h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.z, ref.z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.target_prob, ref.target_prob, atol=1e-4, rtol=1e-4)


def test_without_mpes_runs_to_the_step_limit(tiny_llama_dir):
    lm, tok, requests, prefixes = setup(tiny_llama_dir)
    hp = TargetOptimization(v_num_grad_steps=6, extra_steps=None, nll_stop=0.0)
    out = compute_target_vectors(lm, tok, requests[:3], prefixes, 2, hp)
    assert out.steps.tolist() == [5, 5, 5]  # 6 forward passes, 5 Adam steps, no early stop
    assert ((out.z - out.h).norm(dim=1) <= hp.clamp_norm_factor * out.h.norm(dim=1) + 1e-5).all()


def test_mpes_counts_every_target_position_of_every_prefixed_prompt():
    # Request 0: 1 bare row + 5 prefixed rows, a 2-token target: 12 target tokens.
    row_request = torch.zeros(6, dtype=torch.long)
    row_kind = torch.tensor([0, 1, 1, 1, 1, 1])
    token_row = torch.arange(6).repeat_interleave(2)
    first_tokens_only = torch.tensor([True, False] * 6)  # 5 correct positions among prefixed rows
    assert not prefixed_targets_top1(first_tokens_only, token_row, row_request, row_kind, 1).item()
    all_but_bare = torch.tensor([False, False] + [True] * 10)  # the bare prompt does not count
    assert prefixed_targets_top1(all_but_bare, token_row, row_request, row_kind, 1).item()
    one_miss = all_but_bare.clone()
    one_miss[-1] = False
    assert not prefixed_targets_top1(one_miss, token_row, row_request, row_kind, 1).item()


def test_mpes_stops_at_first_qualifying_check_plus_extra_steps():
    mpes = MostProbableEarlyStopping(3, extra_steps=2)
    active = torch.ones(3, dtype=torch.bool)
    checks = [[1, 0, 1], [0, 0, 1], [1, 0, 1], [1, 1, 0]]  # request 0: hits at checks 0, 2, 3
    stopped_at = {}
    for step, q in enumerate(checks):
        stop = mpes.update(torch.tensor(q, dtype=torch.bool), active)
        for i in torch.nonzero(stop).squeeze(1).tolist():
            stopped_at[i] = step
        active &= ~stop
    assert stopped_at == {2: 2, 0: 3}  # 3 hits each; hits need not be consecutive
    assert MostProbableEarlyStopping(1, None).update(torch.tensor([True]), torch.tensor([True])).tolist() == [False]


def full_model_logits(lm, seqs, z_layer, where, delta):
    """Logits of the whole model on whole (right-padded) sequences, delta added at `where`."""
    from encore_pl.forward import block_output, pad_right

    ids, mask = pad_right(seqs, 0)

    def add(module, args, output):
        hidden = block_output(output).clone()
        hidden[torch.arange(len(seqs)), where] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = lm.block(z_layer).register_forward_hook(add)
    try:
        return lm.model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "gpt_neox", "gemma3_text", "mistral", "qwen2"])
def test_suffix_forward_gives_the_full_models_logits(model_type, tmp_path):
    """Prefix cache + blocks 0..z replayed + only the suffix run = the whole model on the whole prompt."""
    from conftest import make_tiny_model
    from test_layouts import tiny

    if model_type in ("gpt2", "llama"):
        model = load_model_and_tokenizer(str(make_tiny_model(model_type, tmp_path)))[0]
    else:
        model = tiny(model_type).eval()
    lm = LocatedModel(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    seqs = [torch.randint(1, vocab, (length,), generator=g).tolist() for length in (7, 5, 9, 4, 8)]
    seqs[2][:2] = seqs[0][:2]  # rows 0, 2 and 4 share a context: its tokens run once
    seqs[4][:3] = seqs[0][:3]
    split = [3, 0, 5, 1, 3]  # the first suffix token (0: no prefix at all; row 0 is all context)
    groups = [0, -1, 0, -1, 0]
    z_layer = 1
    delta = torch.randn(len(seqs), model.config.hidden_size, generator=g)
    prefix, suffix = [s[:k] for s, k in zip(seqs, split)], [s[k:] for s, k in zip(seqs, split)]
    forward = SuffixForward(lm, prefix, suffix, z_layer, 0, groups)
    with torch.no_grad():
        expected = full_model_logits(lm, seqs, z_layer, torch.tensor(split), delta)
        for rows in (torch.arange(5), torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3])):  # all rows, then fewer
            hidden = forward(rows, delta[rows])
            for local, r in enumerate(rows.tolist()):
                n_suffix = len(seqs[r]) - split[r]
                got = lm.logits(hidden[local, :n_suffix])
                torch.testing.assert_close(got, expected[r, split[r] : len(seqs[r])], atol=1e-4, rtol=1e-4)
    assert not any(isinstance(b, Replay) for b in lm.blocks)  # real blocks are back


def test_chunks_of_requests_give_the_same_target_vectors(tiny_model_dir):
    """target.chunk_size: requests are independent, so optimising them in chunks changes nothing."""
    lm, tok, requests, prefixes = setup(tiny_model_dir)
    hp = TargetOptimization(v_lr=0.5, v_num_grad_steps=12, extra_steps=1, clamp_norm_factor=4.0)
    whole = compute_target_vectors(lm, tok, requests, prefixes, 2, hp)
    chunked = compute_target_vectors(lm, tok, requests, prefixes, 2, TargetOptimization(**{**vars(hp), "chunk_size": 4}))
    assert chunked.steps.tolist() == whole.steps.tolist() and len(set(whole.steps.tolist())) > 1
    torch.testing.assert_close(chunked.z, whole.z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.target_prob, whole.target_prob, atol=1e-6, rtol=1e-6)


def test_step_model_copies_only_the_later_blocks_in_bfloat16(tiny_llama_dir):
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    steps = step_model(lm, 1, torch.bfloat16)
    assert all(isinstance(steps.blocks[i], Replay) for i in (0, 1))  # replayed by the steps: not copied
    assert [type(b) for b in steps.blocks][2:] == [type(b) for b in lm.blocks][2:]
    ours = {t.data_ptr() for t in model.parameters()}
    assert all(t.dtype == torch.bfloat16 and t.data_ptr() not in ours and not t.requires_grad for t in steps.model.parameters())
    assert all(t.dtype == torch.float32 for t in model.parameters())  # the model itself is untouched
    assert steps.model.config._attn_implementation == "eager" != model.config._attn_implementation  # CPU: eager steps only
    copied = sum(t.numel() for t in steps.model.parameters())
    assert copied == sum(t.numel() for t in model.parameters()) - sum(t.numel() for i in (0, 1) for t in lm.blocks[i].parameters())
    assert {n: b.dtype for n, b in steps.model.named_buffers()} == {n: b.dtype for n, b in model.named_buffers()}
    same = reduced_copy(model, torch.float32)  # same dtype: still a copy, never the model's own storage
    assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in zip(same.parameters(), model.parameters()))


def test_bfloat16_steps_give_the_suffix_logits_to_bfloat16_precision(tiny_llama_dir):
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist() for n in (7, 5, 9)]
    split, z_layer = [3, 2, 5], 1
    prefix, suffix = [s[:k] for s, k in zip(seqs, split)], [s[k:] for s, k in zip(seqs, split)]
    delta = 0.1 * torch.randn(3, model.config.hidden_size, generator=g)
    rows = torch.arange(3)
    with torch.no_grad():
        exact = SuffixForward(lm, prefix, suffix, z_layer, 0)(rows, delta)
        steps = SuffixForward(lm, prefix, suffix, z_layer, 0, steps_lm=step_model(lm, z_layer, torch.bfloat16))
        reduced = steps(rows, delta)
    assert reduced.dtype == torch.bfloat16 and not torch.equal(reduced.float(), exact)
    for r, n in enumerate(len(s) for s in suffix):
        torch.testing.assert_close(reduced[r, :n].float(), exact[r, :n], atol=0.05, rtol=0.05)
    torch.testing.assert_close(steps.h, SuffixForward(lm, prefix, suffix, z_layer, 0).h, atol=0, rtol=0)  # h stays float32


def test_bfloat16_steps_keep_h_and_land_near_the_float32_targets(tiny_llama_dir):
    lm, tok, requests, prefixes = setup(tiny_llama_dir)
    hp = TargetOptimization(v_lr=0.5, v_num_grad_steps=15, extra_steps=1, clamp_norm_factor=4.0)
    exact = compute_target_vectors(lm, tok, requests, prefixes, 2, hp)
    reduced = compute_target_vectors(lm, tok, requests, prefixes, 2, TargetOptimization(**{**vars(hp), "compute_dtype": "bfloat16"}))
    assert reduced.z.dtype == torch.float32 and torch.equal(reduced.h, exact.h)
    assert reduced.steps.tolist() == exact.steps.tolist()  # the same MPES decisions here
    moved = (exact.z - exact.h).norm(dim=1)
    assert ((reduced.z - exact.z).norm(dim=1) <= 0.05 * moved).all()  # measured: 0.2-2.3 %
