//! llmsd-engine: pure compute for llmsd, synchronous and free of async runtimes.
//!
//! GGUF files over mmap ([`gguf`]), quantized kernels ([`quant`]), tokenizers ([`tokenizer`]),
//! chat templates ([`chat`]), sampling ([`sampling`]) and the model forward passes ([`model`])
//! running on a persistent thread pool ([`pool`]) over a KV-cache trait ([`kv`]), whose chunked, quantized implementation is [`kvchunk`]. The engine
//! knows nothing about apps, contexts on disk or sockets: the daemon drives it.

pub mod chat;
pub mod fuzzing;
pub mod gguf;
pub mod kv;
pub mod kvchunk;
pub mod model;
pub mod pool;
pub mod quant;
pub mod sampling;
pub mod tokenizer;
