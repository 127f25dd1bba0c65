//! Fuzzes the GGUF parser: any bytes must give a file or an error, never a panic, and every
//! tensor of an accepted file must lie inside it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmsd_engine::fuzzing::gguf_parse(data));
