//! GGUF reader: header, metadata and tensor infos, with tensor data borrowed in place.
//!
//! The file is mapped with memmap2 and never copied. Parsing checks every length, count, offset
//! and dimension against the bytes actually present before using it, so a truncated, oversized
//! or malicious file gives a [`GgufError`], never a panic, an out-of-bounds read or a huge
//! allocation. Layout: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use crate::quant::GgmlType;

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file (bad magic {0:#010x})")]
    BadMagic(u32),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file truncated: needed {needed} bytes at offset {offset}, file has {len}")]
    Truncated { offset: u64, needed: u64, len: u64 },
    #[error("{what} count {count} cannot fit in the {remaining} bytes left in the file")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        remaining: u64,
    },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("metadata nests arrays deeper than allowed (key {0:?})")]
    NestingTooDeep(String),
    #[error("string at offset {0} is not valid UTF-8")]
    BadUtf8(u64),
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("metadata general.alignment = {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
    #[error("metadata key {0:?} not found")]
    MissingKey(String),
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF name of this value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where and what one tensor is.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (ggml's `ne`): a weight matrix of `rows` outputs over `cols`
    /// inputs has `dims == [cols, rows]`.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the file (already checked to lie inside it).
    pub offset: usize,
    /// Size of the data in bytes.
    pub size: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Elements per row (`dims[0]`).
    pub fn n_cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of all dimensions but the first).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    backing: Backing,
    pub version: u32,
    pub alignment: u64,
    /// Offset of the tensor data section from the start of the file.
    pub data_offset: usize,
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to this process. Another process truncating
        // or rewriting the file while it is mapped could change the bytes under us (or SIGBUS);
        // the daemon owns its model files and checks them at start, which is the usual contract
        // of every mmap-based model loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        Self::parse(Backing::Mmap(mmap))
    }

    /// Parses a GGUF image held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<Self, GgufError> {
        let mut r = Reader {
            buf: &backing,
            pos: 0,
        };
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each kv takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least
        // 8 + 4 + 4 + 8. Checking against what is left bounds every allocation below.
        r.check_count("metadata", n_kv, 13)?;
        r.check_count("tensor", n_tensors, 24)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(&key, ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().ok_or_else(|| GgufError::WrongType {
                    key: "general.alignment".into(),
                    expected: "unsigned integer",
                    found: v.type_name(),
                })?;
                if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };

        struct RawTensor {
            name: String,
            dims: Vec<usize>,
            ty: GgmlType,
            rel_offset: u64,
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad_tensor(
                    &name,
                    format!("{n_dims} dimensions (1..=4 allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64()?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0 && d <= i64::MAX as usize)
                    .ok_or_else(|| bad_tensor(&name, format!("invalid dimension {d}")))?;
                dims.push(d);
            }
            let type_id = r.u32()?;
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| bad_tensor(&name, format!("unknown tensor type id {type_id}")))?;
            let rel_offset = r.u64()?;
            raw.push(RawTensor {
                name,
                dims,
                ty,
                rel_offset,
            });
        }

        let file_len = backing.len() as u64;
        let data_offset = align_up(r.pos as u64, alignment)
            .filter(|&o| o <= file_len)
            .ok_or(GgufError::Truncated {
                offset: r.pos as u64,
                needed: alignment,
                len: file_len,
            })?;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for t in raw {
            let n_elems = t
                .dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad_tensor(&t.name, "element count overflows".into()))?;
            if t.dims[0] % t.ty.block_size() != 0 {
                return Err(bad_tensor(
                    &t.name,
                    format!(
                        "row length {} is not a multiple of the {} block size {}",
                        t.dims[0],
                        t.ty,
                        t.ty.block_size()
                    ),
                ));
            }
            let size = (n_elems / t.ty.block_size())
                .checked_mul(t.ty.type_size())
                .ok_or_else(|| bad_tensor(&t.name, "byte size overflows".into()))?;
            if t.rel_offset % alignment != 0 {
                return Err(bad_tensor(
                    &t.name,
                    format!("data offset {} is not {alignment}-aligned", t.rel_offset),
                ));
            }
            let start = data_offset.checked_add(t.rel_offset);
            let end = start.and_then(|s| s.checked_add(size as u64));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => {
                    let info = TensorInfo {
                        name: t.name.clone(),
                        dims: t.dims,
                        ty: t.ty,
                        offset: s as usize,
                        size,
                    };
                    if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                        return Err(GgufError::DuplicateTensor(t.name));
                    }
                    tensors.push(info);
                }
                _ => {
                    return Err(GgufError::Truncated {
                        offset: start.unwrap_or(u64::MAX),
                        needed: size as u64,
                        len: file_len,
                    })
                }
            }
        }
        check_no_overlap(&tensors)?;

        Ok(GgufFile {
            version,
            alignment,
            data_offset: data_offset as usize,
            metadata,
            tensors,
            by_name,
            backing,
        })
    }

    /// The whole file image.
    pub fn bytes(&self) -> &[u8] {
        &self.backing
    }

    /// Drops the mapped pages lying wholly inside `range` from this process's resident set
    /// (`madvise(MADV_DONTNEED)`): for data copied elsewhere (packed weights) that is not read
    /// again. Reading the range later is still correct (the pages fault back in from the
    /// file). No-op for in-memory images and on error.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Backing::Mmap(m) = &self.backing {
            const PAGE: usize = 4096;
            let base = m.as_ptr() as usize;
            let start = (base + range.start).next_multiple_of(PAGE) - base;
            let end = ((base + range.end.min(m.len())) / PAGE * PAGE).saturating_sub(base);
            if start < end {
                // SAFETY: the map is read-only and file-backed: MADV_DONTNEED only unmaps the
                // pages from this process, and any later read faults in the same bytes from the
                // file (the contract of `open` already is that the file does not change). No
                // reference observes different contents.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `info`, borrowed from the map. `info` must come from this file.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        // Offsets were checked against the file length at parse time; `get` keeps even a
        // foreign `info` from reading out of bounds.
        self.backing
            .get(info.offset..info.offset + info.size)
            .unwrap_or(&[])
    }

    /// Info and bytes of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        Ok((info, self.tensor_data(info)))
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "unsigned integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "number", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "bool", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }
}

fn wrong_type(key: &str, expected: &'static str, v: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: v.type_name(),
    }
}

fn bad_tensor(name: &str, reason: String) -> GgufError {
    GgufError::BadTensor {
        name: name.to_string(),
        reason,
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// Two tensors sharing bytes would let a write through one (none today) or a bad file alias
/// weights; llama.cpp rejects this layout too.
fn check_no_overlap(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut spans: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|t| t.size > 0)
        .map(|t| (t.offset, t.offset + t.size, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad_tensor(
                w[1].2,
                format!("data overlaps tensor {:?}", w[0].2),
            ));
        }
    }
    Ok(())
}

/// Array nesting deeper than this is refused (real files use 1).
const MAX_NESTING: u32 = 4;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in what is left.
    fn check_count(&self, what: &'static str, count: u64, min_size: u64) -> Result<(), GgufError> {
        if count.saturating_mul(min_size) > self.remaining() {
            return Err(GgufError::CountTooLarge {
                what,
                count,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        let at = self.pos as u64;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8(at))
    }

    fn value(&mut self, key: &str, ty: u32, depth: u32) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array()?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => {
                let [b] = self.array()?;
                MetaValue::Bool(b != 0)
            }
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(GgufError::NestingTooDeep(key.to_string()));
                }
                let elem_ty = self.u32()?;
                let count = self.u64()?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => 8,
                    9 => 12,
                    10..=12 => 8,
                    _ => {
                        return Err(GgufError::BadValueType {
                            key: key.to_string(),
                            ty: elem_ty,
                        })
                    }
                };
                self.check_count("array element", count, min_size)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(key, elem_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            _ => {
                return Err(GgufError::BadValueType {
                    key: key.to_string(),
                    ty,
                })
            }
        })
    }
}

/// Builds GGUF images, for tests and for tools that write small models.
pub mod writer {
    use super::MetaValue;
    use crate::quant::GgmlType;

    /// One tensor to write: name, dims (innermost first), type and its raw bytes.
    pub struct TensorSpec {
        pub name: String,
        pub dims: Vec<u64>,
        pub ty: GgmlType,
        pub data: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(u8::from(*x)),
            MetaValue::String(s) => put_str(out, s),
            MetaValue::Array(items) => {
                let elem = items.first().map_or(4, type_id);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// A GGUF v3 image with the given metadata and tensors (alignment 32).
    pub fn build(metadata: &[(&str, MetaValue)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for t in tensors {
            out.extend_from_slice(&t.data);
            while out.len() % 32 != 0 {
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{build, TensorSpec};
    use super::*;

    fn sample() -> Vec<u8> {
        build(
            &[
                ("general.architecture", MetaValue::String("llama".into())),
                ("llama.block_count", MetaValue::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    MetaValue::Array(vec![
                        MetaValue::String("a".into()),
                        MetaValue::String("b".into()),
                    ]),
                ),
                ("x.f", MetaValue::F32(0.5)),
            ],
            &[
                TensorSpec {
                    name: "w".into(),
                    dims: vec![4, 2],
                    ty: GgmlType::F32,
                    data: (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect(),
                },
                TensorSpec {
                    name: "q".into(),
                    dims: vec![32],
                    ty: GgmlType::Q8_0,
                    data: vec![7; 34],
                },
            ],
        )
    }

    #[test]
    fn parses_built_image() {
        let g = GgufFile::from_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f64("x.f").unwrap(), 0.5);
        assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), 2);
        let (info, data) = g.tensor("w").unwrap();
        assert_eq!(info.dims, vec![4, 2]);
        assert_eq!((info.n_cols(), info.n_rows()), (4, 2));
        assert_eq!(f32::from_le_bytes(data[28..32].try_into().unwrap()), 7.0);
        assert_eq!(g.tensor("q").unwrap().1, &[7u8; 34][..]);
        assert!(matches!(g.tensor("nope"), Err(GgufError::MissingTensor(_))));
        assert!(matches!(
            g.get_u64("general.architecture"),
            Err(GgufError::WrongType { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let img = sample();
        for len in 0..img.len() - 1 {
            // The last tensor's padding is not needed, so only cut inside real bytes.
            let cut = img[..len].to_vec();
            if let Ok(g) = GgufFile::from_bytes(cut) {
                // Only acceptable if every tensor still fits (cut in the final padding).
                for t in &g.tensors {
                    assert!(t.offset + t.size <= len);
                }
            }
        }
    }

    #[test]
    fn bad_magic_version_and_counts() {
        let mut img = sample();
        img[0] = b'X';
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::BadMagic(_))
        ));
        let mut img = sample();
        img[4] = 1;
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::UnsupportedVersion(1))
        ));
        let mut img = sample();
        img[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::CountTooLarge { .. })
        ));
    }

    #[test]
    fn huge_string_length_is_an_error() {
        let mut img = sample();
        // First key's length field sits right after the 24-byte header.
        img[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::Truncated { .. })
        ));
    }

    #[test]
    fn tensor_checks() {
        let mk = |dims: Vec<u64>, ty, data: Vec<u8>| {
            build(
                &[],
                &[TensorSpec {
                    name: "t".into(),
                    dims,
                    ty,
                    data,
                }],
            )
        };
        // Row not a multiple of the block size.
        assert!(matches!(
            GgufFile::from_bytes(mk(vec![16], GgmlType::Q8_0, vec![0; 34])),
            Err(GgufError::BadTensor { .. })
        ));
        // Data past end of file.
        let mut img = mk(vec![32], GgmlType::Q8_0, vec![0; 34]);
        img.truncate(img.len() - 40);
        assert!(GgufFile::from_bytes(img).is_err());
        // Dimensions whose product overflows.
        assert!(GgufFile::from_bytes(mk(vec![1 << 40, 1 << 40], GgmlType::F32, vec![])).is_err());
        // Zero dimension.
        assert!(GgufFile::from_bytes(mk(vec![0], GgmlType::F32, vec![])).is_err());
    }

    #[test]
    fn overlapping_and_duplicate_tensors() {
        let t = |name: &str| TensorSpec {
            name: name.into(),
            dims: vec![8],
            ty: GgmlType::F32,
            data: vec![0; 32],
        };
        let img = build(&[], &[t("a"), t("a")]);
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::DuplicateTensor(_))
        ));
        let mut img = build(&[], &[t("a"), t("b")]);
        // Point b's offset (last 8 bytes of its info, just before the alignment padding) at 0.
        let info_end = 24 + (8 + 1 + 4 + 8 + 4 + 8) * 2;
        img[info_end - 8..info_end].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::BadTensor { .. })
        ));
    }

    #[test]
    fn nested_arrays_are_bounded() {
        let mut v = MetaValue::U8(1);
        for _ in 0..6 {
            v = MetaValue::Array(vec![v]);
        }
        let img = build(&[("deep", v)], &[]);
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::NestingTooDeep(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn junk_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = GgufFile::from_bytes(bytes);
        }

        #[test]
        fn corrupted_image_never_panics(pos in 0usize..400, val in proptest::prelude::any::<u8>()) {
            let mut img = sample();
            let p = pos % img.len();
            img[p] = val;
            if let Ok(g) = GgufFile::from_bytes(img) {
                for t in &g.tensors {
                    assert!(t.offset + t.size <= g.bytes().len());
                }
            }
        }
    }
}
