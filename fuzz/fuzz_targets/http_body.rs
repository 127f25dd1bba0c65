#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmsd::fuzzing::http_body(data));
