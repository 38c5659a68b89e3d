#!/usr/bin/env python3
"""Make a transformers trust_remote_code dir from a plain ChatGLM3 HF dir (no .py files).
Weights/tokenizer.model/index are symlinked; config.json + tokenizer_config.json are patched copies;
the remote-code .py files are symlinked from remote_code/ beside this script.
usage: make_hf_dir.py SRC_DIR DST_DIR"""
import json, os, sys

src, dst = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code")
os.makedirs(dst, exist_ok=True)

def link(target, name):
    p = os.path.join(dst, name)
    if os.path.lexists(p):
        os.remove(p)
    os.symlink(target, p)

for f in os.listdir(src):
    if f.endswith(".safetensors") or f in ("tokenizer.model", "model.safetensors.index.json", "generation_config.json"):
        link(os.path.join(src, f), f)
for f in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py"):
    link(os.path.join(code, f), f)

cfg = json.load(open(os.path.join(src, "config.json")))
cfg.setdefault("architectures", ["ChatGLMModel"])
cfg["auto_map"] = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
# keys present in the official THUDM/chatglm3-6b config.json but absent from the fixture
cfg.setdefault("original_rope", True)
cfg.setdefault("tie_word_embeddings", False)
cfg.setdefault("use_cache", True)
cfg.setdefault("fp32_residual_connection", False)
cfg.setdefault("hidden_dropout", 0.0)
cfg.setdefault("attention_dropout", 0.0)
cfg.setdefault("bias_dropout_fusion", True)
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)

tok = json.load(open(os.path.join(src, "tokenizer_config.json")))
tok["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
tok.setdefault("padding_side", "left")
json.dump(tok, open(os.path.join(dst, "tokenizer_config.json"), "w"), indent=2)
print("wrote", dst)
