"""Prompts: context prefixes and tokenisation with the subject's last token located exactly."""

from dataclasses import dataclass

import torch

CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_prefixes(
    model, tok, seed: int, starts=CONTEXT_STARTS, length: int = 10, top_k: int = 5
) -> list[str]:
    """Short texts sampled from the model (top-k), one per start word, each ending in ". ".

    As the published code: `length` tokens in all (start word included), braces removed.
    The global random state is left untouched; `seed` alone fixes the result.
    """
    prefixes = []
    device = model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # CUDA's RNG restored too
        torch.manual_seed(seed)
        for start in starts:
            ids = torch.tensor([tok(start).input_ids], device=device)
            n_new = max(1, length - ids.shape[1])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, max_new_tokens=n_new,
                min_new_tokens=n_new, pad_token_id=tok.pad_token_id,
            )
            text = tok.decode(out[0], skip_special_tokens=True)
            prefixes.append(text.replace("{", " ").replace("}", " ") + ". ")
    return prefixes


@dataclass
class Encoded:
    ids: list[int]  # model input: prompt tokens, then target tokens (teacher forcing)
    prompt_len: int
    subject_last: int  # index of the subject's last token in ids
    target_ids: list[int]  # the tokens to predict after the prompt; may be empty

    def target_positions(self) -> list[int]:
        """Positions whose next-token distribution predicts each target token."""
        start = self.prompt_len - 1
        return list(range(start, start + len(self.target_ids)))


def encode_target(tok, prompt_text: str, target: str) -> list[int]:
    """Target token ids as they follow the prompt (the prompt's tokens stay unchanged)."""
    prompt_ids = tok(prompt_text).input_ids
    joint = tok(prompt_text + target).input_ids
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids) :]
    return tok(target, add_special_tokens=False).input_ids


def encode(tok, template: str, subject: str, prefix: str = "", target: str = "", drop_last: bool = True) -> Encoded:
    """Tokenise `prefix + template(subject) [+ target]` and locate the subject's last token.

    With `drop_last`, the last target token is not part of the input (it is only predicted).
    """
    head, tail = template.split("{}", 1)
    text = prefix + head + subject + tail
    subject_end = len(prefix) + len(head) + len(subject)  # character after the subject
    enc = tok(text, return_offsets_mapping=True)
    subject_last = max(
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < subject_end
    )
    ids = list(enc["input_ids"])
    target_ids = encode_target(tok, text, target) if target else []
    fed = target_ids[:-1] if drop_last else target_ids
    return Encoded(ids + fed, len(ids), subject_last, target_ids)


def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest run of tokens that every sequence starts with (none of no sequences)."""
    if not seqs:
        return []
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return seqs[0][:i]
    return seqs[0][:n]
