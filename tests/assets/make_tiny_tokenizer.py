"""Writes tests/assets/tiny-tokenizer: a byte-level BPE with a few hundred tokens, for tiny test models.

Trained on the project's own quickstart facts, so every test prompt tokenises into short pieces.
Run once; the output is committed:  python tests/assets/make_tiny_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
FACTS = HERE.parents[1] / "encore_pl" / "assets" / "quickstart_facts.json"


def texts() -> list[str]:
    out = []
    for rec in json.loads(FACTS.read_text()):
        rw = rec["requested_rewrite"]
        out.append(rw["prompt"].replace("{}", rw["subject"]) + " " + rw["target_true"]["str"])
        out += rec["paraphrase_prompts"] + rec["neighborhood_prompts"] + rec["generation_prompts"]
    return out


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(HERE / "tiny-tokenizer")
    print(f"vocab size {len(fast)}")


if __name__ == "__main__":
    main()
