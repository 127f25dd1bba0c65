//! llmsd-engine: pure compute for llmsd, synchronous and free of async runtimes.
//!
//! GGUF files over mmap ([`gguf`]), quantized kernels ([`quant`]), tokenizers, chat templates,
//! sampling and the model forward passes. The engine knows nothing about apps, contexts on
//! disk or sockets: the daemon drives it.

pub mod gguf;
pub mod quant;
pub mod tokenizer;
