#!/usr/bin/env python3
"""chatglm.cpp 0.4.2 converter (`python -m chatglm_cpp.convert`) with the safetensors-metadata workaround.
usage: convert_ggml.py -i HF_DIR_WITH_REMOTE_CODE -t {f32,f16,q8_0,q4_0,...} -o OUT.bin"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_metadata_patch  # noqa: F401
from chatglm_cpp.convert import main

if __name__ == "__main__":
    main()
