#!/usr/bin/env python3
"""Writes a ChatGLM3 model directory (the synthetic one `chathub bench` makes) as the GGUF file
llama.cpp's `convert_hf_to_gguf.py` would write: architecture `chatglm`, llama.cpp's tensor
names, 16-bit matrices and f32 norms and biases, the sentencepiece vocabulary padded to
`padded_vocab_size`.

llama.cpp's own converter reads ChatGLM3's vocabulary through the model's remote tokenizer code
(`trust_remote_code`), which a synthetic directory does not have; this script reads the
`tokenizer.model` with sentencepiece instead. llama-bench times random token ids, so only the
vocabulary's size and token types matter to it.

    python make_llama_gguf.py MODEL_DIR OUT.gguf --gguf-py LLAMA_CPP/gguf-py [--dtype f16|f32]

Then `llama-quantize OUT.gguf OUT-q4_0.gguf q4_0` (and q8_0) as llama.cpp users do.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gguf-py", type=Path, required=True, help="llama.cpp's gguf-py folder")
    parser.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    args = parser.parse_args()
    sys.path.insert(0, str(args.gguf_py))
    import gguf  # noqa: E402  (from the llama.cpp source being benchmarked)
    import sentencepiece
    from safetensors import safe_open

    config = json.loads((args.model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("kv_channels", hidden // heads)
    vocab_size = config["padded_vocab_size"]

    writer = gguf.GGUFWriter(str(args.out), "chatglm")
    writer.add_name(config.get("_name_or_path", args.model_dir.name))
    writer.add_context_length(config["seq_length"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["ffn_hidden_size"])
    writer.add_block_count(config["num_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("multi_query_group_num", heads))
    writer.add_layer_norm_rms_eps(config.get("layernorm_epsilon", 1e-5))
    writer.add_rope_dimension_count(head_dim // 2)
    writer.add_rope_freq_base(10000.0 * config.get("rope_ratio", 1.0))
    writer.add_add_bos_token(False)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if args.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(file_type)

    # Vocabulary: the sentencepiece pieces, ChatGLM3's special tokens after them, then padding.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(args.model_dir / "tokenizer.model"))
    types = gguf.TokenType
    tokens, scores, token_types = [], [], []
    for i in range(sp.vocab_size()):
        piece = {0: "<unk>", 1: "<bos>", 2: "<eos>"}.get(i, sp.id_to_piece(i))
        tokens.append(piece.encode())
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            token_types.append(types.UNKNOWN)
        elif sp.is_control(i):
            token_types.append(types.CONTROL)
        elif sp.is_byte(i):
            token_types.append(types.BYTE)
        else:
            token_types.append(types.NORMAL)
    special = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
               "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    for piece in special:
        tokens.append(piece.encode())
        scores.append(0.0)
        token_types.append(types.CONTROL)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(0.0)
        token_types.append(types.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_eos_token_id(config.get("eos_token_id", 2))

    names = {
        "embedding.word_embeddings.weight": "token_embd.weight",
        "encoder.final_layernorm.weight": "output_norm.weight",
        "output_layer.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attention.query_key_value.weight": "attn_qkv.weight",
        "self_attention.query_key_value.bias": "attn_qkv.bias",
        "self_attention.dense.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.dense_h_to_4h.weight": "ffn_up.weight",
        "mlp.dense_4h_to_h.weight": "ffn_down.weight",
    }
    index = json.loads((args.model_dir / "model.safetensors.index.json").read_text())
    wide = np.float16 if args.dtype == "f16" else np.float32
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(args.model_dir / shard), "np") as f:
            for name in f.keys():
                short = name.removeprefix("transformer.")
                if short.endswith("rotary_pos_emb.inv_freq"):
                    continue
                if short.startswith("encoder.layers."):
                    _, _, layer, rest = short.split(".", 3)
                    target = f"blk.{layer}.{per_layer[rest]}"
                else:
                    target = names[short]
                tensor = f.get_tensor(name)
                # As llama.cpp's converter: 1-D tensors (norms, biases) stay f32.
                tensor = tensor.astype(np.float32 if tensor.ndim == 1 else wide)
                writer.add_tensor(target, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
