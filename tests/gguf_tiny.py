"""A tiny Llama with a byte-level BPE tokenizer and a ChatML template, written as a GGUF file with the ``gguf``
package the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama (no download): tensor names from
``gguf``'s own name map, q/k rows permuted for llama.cpp's rope, tied embeddings (no ``output.weight``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

gguf = __import__("pytest").importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["What is 47 + 38? The answer is 85.", "system user assistant", "To add 59 and 63, we add them: 122.",
          "Hello, how are you? I am fine.", "12 + 34 = 46", "0123456789 + - * = ?"] * 4


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (vocabulary 320) trained on ``CORPUS``; ids 0-2 are ``SPECIALS``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads over 2 key/value heads (grouped, as SmolLM2), tied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm mapped to the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def permute_for_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rows reordered from halves to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
               qtype=None) -> dict[str, np.ndarray]:
    """Write ``model`` and ``tokenizer`` as a GGUF file; matrices quantised to ``qtype`` (e.g. Q4_1) or float32.
    Returns, per transformers parameter name, the float32 weights a correct reader must recover (the matrices
    as ``gguf``'s own numpy dequantiser gives them back, rope permutation undone)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q4_1)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    expected = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied: llama.cpp writes no output.weight
            continue
        data = tensor.numpy().astype(np.float32)
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
        head = next((h for part, h in heads.items() if part in key), None)
        if head is not None:
            data = permute_for_rope(data, head)
        if qtype is not None and data.ndim == 2:
            stored = gguf.quants.quantize(data, qtype)
            back = gguf.quants.dequantize(stored, qtype).reshape(data.shape)
            w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), stored, raw_dtype=qtype)
        else:
            back = data
            w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), data)
        if head is not None:  # undo the permutation: the inverse of permute_for_rope
            back = back.reshape(head, back.shape[0] // head // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        expected[key] = back.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def make_tiny_gguf(path: Path, qtype=None, seed: int = 0):
    """``(gguf file, the model it came from, its tokenizer, expected weights)``; see :func:`write_gguf`."""
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, model, tokenizer, write_gguf(path, model, tokenizer, qtype)


def digit_count(completions, **_) -> list[float]:
    """A reward with a signal for a random model: the number of digits in the reply."""
    from gvpo.rewards import completion_text

    return [float(sum(ch.isdigit() for ch in completion_text(c) or "")) for c in completions]
