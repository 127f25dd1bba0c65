//! Fuzzes the GGUF parser: any bytes must give a file or an error, never a panic, and every
//! tensor of an accepted file must lie inside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmsd_engine::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        for t in &file.tensors {
            assert!(t.offset + t.size <= data.len());
            let _ = file.tensor_data(t);
        }
        for v in file.metadata.values() {
            let _ = (v.as_u64(), v.as_f64(), v.as_str(), v.as_array());
        }
    }
});
