#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmsd_engine::fuzzing::chat_template(data));
