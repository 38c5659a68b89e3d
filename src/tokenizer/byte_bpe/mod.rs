//! Byte-level BPE as GLM-4 ships it: tiktoken's `tokenizer.model` (glm-4-9b-chat) and Hugging
//! Face's `tokenizer.json` (-hf, 0414), matching the official Python tokenizers id for id.
//!
//! Module map: [`pretokenize`] (linear-time scanner for GLM-4's split pattern, look-ahead
//! included), [`bpe`] (tiktoken's merge rule in O(n log n)), [`tiktoken`] and [`hf_json`] (the
//! two file formats), [`specials`] (special-token ids and splitting), [`bytelevel`] (GPT-2's
//! byte alphabet), [`decode`](mod@decode) (whole and streaming decoding), [`any`] (either format
//! behind one type).

pub(crate) mod any;
pub(crate) mod bpe;
pub(crate) mod bytelevel;
pub(crate) mod decode;
pub(crate) mod error;
pub(crate) mod hf_json;
pub(crate) mod pretokenize;
pub(crate) mod specials;
pub(crate) mod tiktoken;
mod unicode_tables;

#[cfg(test)]
mod cases;
