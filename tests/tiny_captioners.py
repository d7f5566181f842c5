"""Tiny, random captioning models written to local directories, for loading tests of the transformers paths."""

from __future__ import annotations

WORDS = ["<unk>", "<s>", "</s>", "a", "room", "with", "blue", "walls", "bed", "caption", ":", "."]


def word_tokenizer():
    """A word-level fast tokenizer over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def write_tiny_llm(path) -> str:
    """Write a tiny random Llama causal LM and its tokenizer to path; return str(path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    word_tokenizer().save_pretrained(path)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def write_tiny_blip2(path, num_query_tokens: int = 4) -> str:
    """Write a tiny random BLIP2 (ViT, Q-Former, OPT) and its processor to path; return str(path)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    # The processor adds an "<image>" token to the tokenizer; generate() fills num_query_tokens of them
    # with the Q-Former's outputs, so the model's image_token_index must be that token's id.
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), word_tokenizer(),
                               num_query_tokens=num_query_tokens)
    processor.save_pretrained(path)
    tokenizer = processor.tokenizer
    vision = Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                 cross_attention_frequency=1)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                         num_query_tokens=num_query_tokens, image_text_hidden_size=16,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    return str(path)
