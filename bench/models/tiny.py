"""Tiny random-weight causal LMs built from configs: no download, seconds on a CPU. For tests and demos."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel, ModelSpec
from tokenbench.models.hf_utils import resolve_device, resolve_dtype
from tokenbench.registry import register_model

# ChatML, as SmolLM2 and Qwen use it, so tiny models exercise the same chat-template path as real ones.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAIN_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The special magic number is hidden somewhere in the text. What is the best thing to do in San Francisco? "
    "Eat a sandwich and sit in Dolores Park on a sunny day. 0123456789"
)


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in milliseconds on fixed text: deterministic, covers any input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAIN_TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


@register_model("tiny-llama")
@dataclass
class TinyLlama(ModelSpec):
    """A Llama-architecture model with random weights (GQA by default), built from a config."""

    families: ClassVar[tuple[str, ...]] = ("kv", "prompt")

    num_hidden_layers: int = 2  # decoder layers
    hidden_size: int = 64  # model width
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # KV heads (GQA when fewer than query heads)
    intermediate_size: int = 128  # MLP width
    max_position_embeddings: int = 8192  # RoPE table length
    seed: int = 0  # weight initialisation seed
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "eager"  # eager | sdpa

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise TokenbenchError(
                f"tiny-llama: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def load(self) -> LoadedModel:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        config._attn_implementation = self.attn_implementation
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(config)
        model = model.to(device=device, dtype=dtype).eval()
        return LoadedModel.wrap(model, tok, device, dtype, source=f"random init (seed {self.seed})")
