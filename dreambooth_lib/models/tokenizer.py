"""The real CLIP BPE vocabulary (package data), as the tokenizer files Stable Diffusion's CLIPTokenizer reads."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the BPE works on these characters)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@lru_cache(maxsize=1)
def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab (49408 tokens) and merges of CLIP's tokenizer, derived exactly as OpenAI CLIP / open_clip derive them
    from `bpe_simple_vocab_16e6.txt.gz` (shipped as package data, MIT-licensed, see assets/LICENSE.clip-bpe)."""
    raw = resources.files("dreambooth_lib").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) with the real 49408-token vocabulary."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:  # transformers >= 5 takes the vocabulary itself
        tok = CLIPTokenizer(
            vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=77
        )
    except TypeError:  # transformers 4
        tok = CLIPTokenizer(
            vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"), model_max_length=77
        )
    tok.save_pretrained(out)
    return out
