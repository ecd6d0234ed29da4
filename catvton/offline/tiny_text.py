"""The tiny base's text side: tokenizers built in code (characters plus the words of the
CatVTON-Flux prompt, no download) and 32-wide CLIP / T5 encoders, random init.

Part of :mod:`catvton.offline.tiny_base`, which assembles the whole base.
"""

from __future__ import annotations

import re

import torch

CATVTON_PROMPT = (
    "The pair of images highlights a clothing and its styling on a model, high resolution, "
    "4K, 8K; [IMAGE1] Detailed product shot of a clothing [IMAGE2] The same cloth is worn by "
    "a model in a lifestyle setting."
)
"""The CatVTON-Flux prompt; its words are whole tokens of the tiny tokenizers. A copy of
``ModelConfig.prompt`` kept here on purpose: the built base must not change when a config does."""

T5_MAX_LENGTH = 512
"""FluxFillPipeline pads T5 input to ``max_sequence_length`` (default 512)."""
CLIP_MAX_LENGTH = 77
T5_EXTRA_IDS = 8


def _prompt_words(text: str = CATVTON_PROMPT) -> list[str]:
    """Distinct words of ``text`` in order of appearance (case kept)."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[A-Za-z]+", text):
        seen.setdefault(w, None)
    return list(seen)


def build_clip_tokenizer():
    """A CLIP byte-level BPE tokenizer over printable ASCII plus merges that spell the prompt's words.

    CLIP lowercases and splits words off punctuation; every printable ASCII character maps to
    itself in byte-level BPE, so characters (bare and with the ``</w>`` end-of-word mark) cover
    any ASCII text, and the merges make most prompt words single tokens.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        c = chr(code)
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in _prompt_words()}):
        parts = list(word)
        parts[-1] += "</w>"
        cur = parts[0]
        for nxt in parts[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A T5 (unigram) tokenizer: the prompt's words as ``▁word`` pieces, ASCII characters as fallback.

    T5 is case-sensitive, so words are taken as written. Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
    as in T5; ``model_max_length`` is 512 so that the pipeline's padding to 512 is not truncated.
    """
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in _prompt_words():
        add("▁" + w, -1.0)
        add(w, -1.5)  # inside brackets: "[IMAGE1]" -> "▁[", "IMAGE", "1", "]"
    for code in range(33, 127):
        add(chr(code), -5.0)
        add("▁" + chr(code), -5.0)
    for i in range(T5_EXTRA_IDS - 1, -1, -1):  # extra ids last, in reverse, as in T5
        pieces.append((f"<extra_id_{i}>", 0.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)


def build_text_encoders(seed: int):
    """``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)``: tiny CLIP and T5, random init."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,  # pooler_output (the eos token's state) -> pooled_projection_dim=32
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling takes the first eos position
        pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,  # -> joint_attention_dim=32
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(t5_config)
    return tokenizer, text_encoder.eval(), tokenizer_2, text_encoder_2.eval()
