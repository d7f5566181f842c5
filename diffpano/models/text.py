"""Prompt encoding with transformers text encoders, and a small word-level tokenizer built in code."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

MAX_PROMPT_TOKENS = 77
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# Words of the indoor-scene vocabulary; anything else maps to [UNK].
SCENE_WORDS = """
a an the and with of in on under near by to at is are stands sits its this room walls wall floor ceiling window windows
door doorway light lamp bedroom living kitchen bathroom office hallway dining red orange yellow green blue purple pink
white gray grey black beige brown wooden wood carpet carpeted tile tiled stone marble bed sofa couch table chair chairs
cabinet cabinets bathtub tub sink toilet desk shelf shelves wardrobe counter stove fridge rug plant painted bright dark
large small cozy modern two one panorama view leads into from next . ,
""".split()


def build_word_tokenizer(words: list[str] | None = None, max_length: int = 32) -> PreTrainedTokenizerFast:
    """A BERT-style lowercase word-level tokenizer over `words` (default: the scene vocabulary)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(words or SCENE_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
    )


def prompt_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of tokens every prompt is padded or truncated to."""
    return min(int(tokenizer.model_max_length), MAX_PROMPT_TOKENS)


@torch.no_grad()
def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str], batch_size: int = 64
) -> torch.Tensor:
    """Token-wise embeddings (P, L, D) of prompts, padded to a fixed length as Stable Diffusion does."""
    device = next(text_encoder.parameters()).device
    # CLIP text encoders of Stable Diffusion are used without an attention mask; other encoders get theirs.
    use_mask = "clip" not in type(text_encoder).__name__.lower()
    chunks = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[i : i + batch_size], padding="max_length", max_length=prompt_length(tokenizer),
            truncation=True, return_tensors="pt",
        )
        kwargs = {"attention_mask": batch["attention_mask"].to(device)} if use_mask else {}
        chunks.append(text_encoder(batch["input_ids"].to(device), **kwargs).last_hidden_state)
    return torch.cat(chunks)
