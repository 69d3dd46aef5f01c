"""A tiny random Llama with a tiny byte-level tokenizer and a chat template, saved as an HF folder.

Everything is built offline: the tokenizer has the 256 byte symbols plus three special tokens,
so any text round-trips exactly and sequences stay short enough for tests to run in seconds.
"""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model_dir(path: str, seed: int = 0, tie: bool = True) -> str:
    """Write a 2-layer Llama (hidden 32) and its tokenizer to ``path``; returns ``path``."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def alpaca_rows(n: int) -> list[dict]:
    """A trivially learnable task: repeat a number word."""
    words = ["red", "blue", "green", "gold", "pink", "gray"]
    return [{"instruction": f"Say {words[i % 6]}", "input": "", "output": words[i % 6]} for i in range(n)]


def exists(path: str, *names: str) -> bool:
    return all(os.path.isfile(os.path.join(path, n)) for n in names)


# llama.cpp's tensor names for the tiny Llama's weights (per block: blk.N.<name>)
GGUF_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: str, model_dir: str) -> str:
    """The tiny Llama of ``model_dir`` as a float32 GGUF file (Llama metadata, the byte tokenizer); returns ``path``.

    transformers loads it through its float path (``from_pretrained(..., gguf_file=...)``) in a fraction of
    a second, so tests of GGUF loading need not load the 98 MB SmolLM2 file.
    """
    from gguf import GGUFWriter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config, tokenizer = model.config, tiny_tokenizer()
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in GGUF_BLOCK_NAMES.items()})
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        writer.add_tensor(gguf_name, state[hf_name].float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensor_offset(path: str, name: str) -> int:
    """Where tensor ``name``'s data starts in a GGUF file (to damage it on purpose)."""
    from gguf import GGUFReader

    return int(next(t for t in GGUFReader(path).tensors if t.name == name).data_offset)


def gguf_header_size(path: str) -> int:
    """Bytes before the first tensor's data: metadata and tensor infos (cutting inside it breaks the parse)."""
    from gguf import GGUFReader

    return int(min(t.data_offset for t in GGUFReader(path).tensors))
