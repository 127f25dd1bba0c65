//! Swap files: *segments* of KV chunks, read back section by section.
//!
//! A segment holds everything one closed call swapped out (its new chunks, chunks it
//! re-quantized, its tail), so swap-out costs one file, one fsync and one rename per call,
//! and a restore opens each segment it needs once, however many of its chunks it reads. An
//! *item* of a segment is one chunk (one section per layer), one staged tail (one section),
//! or one whole context (`swap-whole`: one section per chunk and one for the tail).
//!
//! # File layout (version 2, all integers little-endian)
//!
//! | offset            | size            | field                                               |
//! |-------------------|-----------------|-----------------------------------------------------|
//! | 0                 | 8               | magic `b"LLMSDKV1"`                                 |
//! | 8                 | 4               | `u32` format version (= 2)                          |
//! | 12                | 4               | `u32` n_items                                       |
//! | 16                | 8               | `u64` shape_hash (model/KV shape; rejects foreign files) |
//! | 24                | 4               | `u32` n_sections, over all items                    |
//! | 28                | 8 × n_items     | item table, per item: `u8` precision tag, `u8` kind, |
//! |                   |                 | `u16` n_tokens, `u32` n_sections of the item        |
//! | 28 + 8i           | 12 × n_sections | section table, item by item: `u32` stored length,   |
//! |                   |                 | `u32` raw length, `u32` crc32 of the raw bytes      |
//! | h = 28 + 8i + 12s | 4               | `u32` crc32 of bytes `0 .. h` (header and tables)   |
//! | h + 4             | ...             | the sections, item by item, in table order, back to back |
//!
//! A section whose stored length equals its raw length is stored as is; a shorter one is an
//! lz4 *block* (`lz4_flex::block`, no frame). The writer uses lz4 only where it saves at
//! least an eighth: quantized and f16 KV does not compress (measured: lz4 keeps 100.4% of
//! every precision's bytes), and a stored section is read with one copy. Every section is
//! checked against its crc32 when read, so a damaged section costs only its own chunk.
//!
//! The reader accepts only this exact shape: the section counts add up, the first section
//! starts right after the header crc, and the file ends where the last section ends.
//! Anything else (a short file, trailing bytes, a length out of range, a raw length no lz4
//! block could expand to) is an error on [`SwapFile::open`]; a damaged section is an error
//! on [`SwapFile::read_section`]. No input makes either panic.
//!
//! Version 1 files (one chunk per file, every layer an lz4 block; written by earlier builds)
//! are still read, as a segment of one item.
//!
//! Files are written to `<path>.tmp` (mode 0600), fsynced and renamed into place, so a
//! reader never sees a partly written file under the final name.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::durable::write_file_atomic_with;

/// The first 8 bytes of every swap file.
pub const MAGIC: [u8; 8] = *b"LLMSDKV1";
/// The format version this module writes (segments).
pub const VERSION: u32 = 2;
/// The one-chunk-per-file format of earlier builds, still read.
pub const VERSION_1: u32 = 1;
/// Version 2: bytes before the item table.
const FIXED_LEN: usize = 28;
const ITEM_LEN: usize = 8;
const SECTION_LEN: usize = 12;
/// Version 1: bytes before the layer table, and per layer-table entry.
const V1_FIXED_LEN: usize = 28;
const V1_ENTRY_LEN: usize = 20;
/// Bytes of the header/table crc.
const CRC_LEN: usize = 4;
/// An lz4 block expands at most ~255× (each extra match-length byte adds 255 output bytes);
/// a table claiming more is corrupt, and we refuse to allocate for it.
const MAX_LZ4_RATIO: u64 = 256;
/// Slack for tiny blocks (an empty input still compresses to one token byte).
const LZ4_RATIO_SLACK: u64 = 64;
/// Writes go through a buffer of this size (a segment is thousands of small sections); small
/// enough that one write call is short, so the I/O thread reaches its next yield point soon.
const WRITE_BUFFER: usize = 128 << 10;
/// Bytes read at open in one go; a longer header and table is read with a second read.
const HEAD_READ: usize = 4096;
/// At most this many buffers per vectored read (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;

/// Why a swap file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("swap file I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a swap file (bad magic)")]
    BadMagic,
    #[error("unsupported swap file version {0} (this build reads versions 1 and {VERSION})")]
    UnsupportedVersion(u32),
    #[error("swap file is truncated")]
    Truncated,
    #[error("swap file is corrupt: {0}")]
    Corrupt(String),
    #[error("swap file item {item} section {section} fails its checksum")]
    Checksum { item: usize, section: usize },
    #[error("item {item} out of range (the file has {n_items} items)")]
    ItemOutOfRange { item: usize, n_items: usize },
    #[error("section {section} out of range (item {item} has {n_sections} sections)")]
    SectionOutOfRange {
        item: usize,
        section: usize,
        n_sections: usize,
    },
    #[error("output buffer for item {item} section {section} is {got} bytes, the section has {expected}")]
    BufferSize {
        item: usize,
        section: usize,
        expected: usize,
        got: usize,
    },
    #[error(
        "swap file is for another model/KV shape (hash {found:#018x}, expected {expected:#018x})"
    )]
    ShapeMismatch { expected: u64, found: u64 },
    #[error("cannot write swap file: {0}")]
    InvalidInput(String),
}

impl SwapError {
    /// True when the file's *content* is bad (as opposed to an I/O failure, a caller mistake
    /// or a file from another model): the chunk should be recomputed.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            SwapError::BadMagic
                | SwapError::UnsupportedVersion(_)
                | SwapError::Truncated
                | SwapError::Corrupt(_)
                | SwapError::Checksum { .. }
        )
    }
}

/// What a swap file says about one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemHeader {
    /// Precision tag of the item's bytes (meaning owned by the KV store).
    pub precision: u8,
    /// What the item is (meaning owned by the KV store).
    pub kind: u8,
    pub n_tokens: u16,
    pub n_sections: u32,
}

/// One item to write: its header fields and its sections' raw bytes.
#[derive(Clone, Debug)]
pub struct ItemSpec<'a> {
    pub precision: u8,
    pub kind: u8,
    pub n_tokens: u16,
    pub sections: Vec<&'a [u8]>,
}

/// What [`write_segment`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// Size of the file.
    pub file_bytes: u64,
    /// Stored bytes of each item's sections.
    pub item_bytes: Vec<u64>,
}

fn u32_of(what: &str, n: usize) -> Result<u32, SwapError> {
    u32::try_from(n).map_err(|_| SwapError::InvalidInput(format!("{what} {n} does not fit in u32")))
}

/// A section as it goes to disk: as is, or lz4-compressed.
enum Encoded<'a> {
    Stored(&'a [u8]),
    Lz4(Vec<u8>),
}

impl Encoded<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Encoded::Stored(b) => b,
            Encoded::Lz4(v) => v,
        }
    }
}

/// lz4 of `raw` if that saves at least an eighth of it.
fn lz4_if_worth_it(raw: &[u8]) -> Option<Vec<u8>> {
    let c = lz4_flex::block::compress(raw);
    (c.len() * 8 <= raw.len() * 7).then_some(c)
}

/// Writes a segment atomically: to `path` + ".tmp" (mode 0600), header and tables, then each
/// item's sections; fsync, rename into place. `pace(i)` is called before item `i` is written
/// (fault injection slows writes down with it). Does NOT fsync the directory (see
/// [`super::durable::sync_dir`]): the manifest write that follows does.
pub fn write_segment(
    path: &Path,
    shape_hash: u64,
    items: &[ItemSpec],
    pace: &mut dyn FnMut(usize, usize),
) -> Result<Written, SwapError> {
    let n_sections: usize = items.iter().map(|it| it.sections.len()).sum();
    let header_len = FIXED_LEN + ITEM_LEN * items.len() + SECTION_LEN * n_sections;
    let mut head = Vec::with_capacity(header_len + CRC_LEN);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&u32_of("item count", items.len())?.to_le_bytes());
    head.extend_from_slice(&shape_hash.to_le_bytes());
    head.extend_from_slice(&u32_of("section count", n_sections)?.to_le_bytes());
    for it in items {
        head.push(it.precision);
        head.push(it.kind);
        head.extend_from_slice(&it.n_tokens.to_le_bytes());
        head.extend_from_slice(&u32_of("item section count", it.sections.len())?.to_le_bytes());
    }
    // Whether lz4 pays is decided on an item's first section: KV of one precision either
    // compresses or (as measured) does not.
    let mut encoded: Vec<Vec<Encoded>> = Vec::with_capacity(items.len());
    let mut item_bytes = Vec::with_capacity(items.len());
    for it in items {
        let try_lz4 = it
            .sections
            .first()
            .is_some_and(|s| !s.is_empty() && lz4_if_worth_it(s).is_some());
        let enc: Vec<Encoded> = it
            .sections
            .iter()
            .map(|&s| match try_lz4.then(|| lz4_if_worth_it(s)).flatten() {
                Some(c) => Encoded::Lz4(c),
                None => Encoded::Stored(s),
            })
            .collect();
        let mut bytes = 0u64;
        for (raw, e) in it.sections.iter().zip(&enc) {
            let stored = e.bytes();
            head.extend_from_slice(&u32_of("section length", stored.len())?.to_le_bytes());
            head.extend_from_slice(&u32_of("section length", raw.len())?.to_le_bytes());
            head.extend_from_slice(&crc32fast::hash(raw).to_le_bytes());
            bytes += stored.len() as u64;
        }
        item_bytes.push(bytes);
        encoded.push(enc);
    }
    debug_assert_eq!(head.len(), header_len);
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    let file_bytes = write_file_atomic_with(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(WRITE_BUFFER, f);
        w.write_all(&head)?;
        let mut len = head.len() as u64;
        for (i, enc) in encoded.iter().enumerate() {
            for (k, e) in enc.iter().enumerate() {
                pace(i, k);
                w.write_all(e.bytes())?;
                len += e.bytes().len() as u64;
            }
        }
        w.flush()?;
        Ok(len)
    })?;
    Ok(Written {
        file_bytes,
        item_bytes,
    })
}

/// One section, validated against the file size on open.
#[derive(Clone, Copy, Debug)]
struct Section {
    offset: usize,
    stored: usize,
    raw: usize,
    crc: u32,
    lz4: bool,
}

#[derive(Clone, Copy, Debug)]
struct Item {
    header: ItemHeader,
    /// Index of its first section in `SwapFile::sections`.
    first: usize,
    stored_bytes: u64,
}

/// An open swap file; header and tables read and validated on open, sections read (with
/// `pread`) as asked for.
pub struct SwapFile {
    file: File,
    file_len: u64,
    version: u32,
    shape_hash: u64,
    items: Vec<Item>,
    sections: Vec<Section>,
}

impl std::fmt::Debug for SwapFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapFile")
            .field("version", &self.version)
            .field("items", &self.items.len())
            .field("file_bytes", &self.file_len)
            .finish()
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What [`parse`] made of the head of a file: its tables, or how many bytes of head it needs.
enum Head {
    Need(usize),
    Parsed(Parsed),
}

struct Parsed {
    version: u32,
    shape_hash: u64,
    items: Vec<Item>,
    sections: Vec<Section>,
}

/// Checks one section's lengths; returns its end offset.
fn check_section(
    what: &dyn Fn() -> String,
    offset: u64,
    stored: u64,
    raw: u64,
    lz4: bool,
    file_len: u64,
) -> Result<u64, SwapError> {
    let end = offset
        .checked_add(stored)
        .ok_or_else(|| SwapError::Corrupt(format!("{} end overflows", what())))?;
    if end > file_len {
        return Err(SwapError::Truncated);
    }
    if lz4 && raw > stored * MAX_LZ4_RATIO + LZ4_RATIO_SLACK {
        return Err(SwapError::Corrupt(format!(
            "{}: raw length {raw} impossible for a {stored}-byte lz4 block",
            what()
        )));
    }
    Ok(end)
}

/// Validates the head `b` of a file of `file_len` bytes (its first `min(file_len, n)`
/// bytes for some n) and returns its tables, or how long a head they need.
/// Every index below is checked against `b.len()` first, so this never panics.
fn parse(b: &[u8], file_len: u64) -> Result<Head, SwapError> {
    if b.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(b) {
            SwapError::Truncated
        } else {
            SwapError::BadMagic
        });
    }
    if b[..8] != MAGIC {
        return Err(SwapError::BadMagic);
    }
    if b.len() < 12 {
        return Err(SwapError::Truncated);
    }
    match le_u32(b, 8) {
        VERSION => parse_v2(b, file_len),
        VERSION_1 => parse_v1(b, file_len),
        v => Err(SwapError::UnsupportedVersion(v)),
    }
}

fn parse_v2(b: &[u8], file_len: u64) -> Result<Head, SwapError> {
    if b.len() < FIXED_LEN {
        return Err(SwapError::Truncated);
    }
    let n_items = u64::from(le_u32(b, 12));
    let shape_hash = le_u64(b, 16);
    let n_sections = u64::from(le_u32(b, 24));
    // u64 arithmetic: both counts < 2^32, so this cannot overflow.
    let items_at = FIXED_LEN as u64;
    let sections_at = items_at + ITEM_LEN as u64 * n_items;
    let table_end = sections_at + SECTION_LEN as u64 * n_sections;
    let data_start = table_end + CRC_LEN as u64;
    if data_start > file_len {
        return Err(SwapError::Truncated);
    }
    if data_start > b.len() as u64 {
        return Ok(Head::Need(data_start as usize));
    }
    // Now data_start ≤ b.len(), so these fit in usize.
    let (sections_at, table_end) = (sections_at as usize, table_end as usize);
    if crc32fast::hash(&b[..table_end]) != le_u32(b, table_end) {
        return Err(SwapError::Corrupt("header checksum mismatch".into()));
    }
    let mut items = Vec::with_capacity(n_items as usize);
    let mut total = 0u64;
    for i in 0..n_items as usize {
        let e = FIXED_LEN + ITEM_LEN * i;
        let header = ItemHeader {
            precision: b[e],
            kind: b[e + 1],
            n_tokens: le_u16(b, e + 2),
            n_sections: le_u32(b, e + 4),
        };
        items.push(Item {
            header,
            first: total as usize,
            stored_bytes: 0,
        });
        total += u64::from(header.n_sections);
    }
    if total != n_sections {
        return Err(SwapError::Corrupt(format!(
            "items name {total} sections, the table holds {n_sections}"
        )));
    }
    let mut sections = Vec::with_capacity(n_sections as usize);
    let mut offset = data_start;
    for (i, item) in items.iter_mut().enumerate() {
        for s in 0..item.header.n_sections as usize {
            let e = sections_at + SECTION_LEN * (item.first + s);
            let stored = u64::from(le_u32(b, e));
            let raw = u64::from(le_u32(b, e + 4));
            let crc = le_u32(b, e + 8);
            if stored > raw {
                return Err(SwapError::Corrupt(format!(
                    "item {i} section {s}: stored {stored} bytes for {raw} raw"
                )));
            }
            let lz4 = stored < raw;
            let what = || format!("item {i} section {s}");
            let end = check_section(&what, offset, stored, raw, lz4, file_len)?;
            // offset, end ≤ file_len (the size of a file we read) and raw < 2^32: all fit
            // in usize on the 64-bit targets this builds for.
            sections.push(Section {
                offset: offset as usize,
                stored: stored as usize,
                raw: raw as usize,
                crc,
                lz4,
            });
            item.stored_bytes += stored;
            offset = end;
        }
    }
    if offset != file_len {
        return Err(SwapError::Corrupt(format!(
            "{} trailing bytes after the last section",
            file_len - offset
        )));
    }
    Ok(Head::Parsed(Parsed {
        version: VERSION,
        shape_hash,
        items,
        sections,
    }))
}

/// A version 1 file: one chunk, each layer an lz4 block at an explicit offset.
fn parse_v1(b: &[u8], file_len: u64) -> Result<Head, SwapError> {
    if b.len() < V1_FIXED_LEN {
        return Err(SwapError::Truncated);
    }
    let n_layers = le_u32(b, 24);
    let header = ItemHeader {
        precision: b[12],
        kind: b[13],
        n_tokens: le_u16(b, 14),
        n_sections: n_layers,
    };
    let shape_hash = le_u64(b, 16);
    let table_end = V1_FIXED_LEN as u64 + V1_ENTRY_LEN as u64 * u64::from(n_layers);
    let data_start = table_end + CRC_LEN as u64;
    if data_start > file_len {
        return Err(SwapError::Truncated);
    }
    if data_start > b.len() as u64 {
        return Ok(Head::Need(data_start as usize));
    }
    let table_end = table_end as usize;
    if crc32fast::hash(&b[..table_end]) != le_u32(b, table_end) {
        return Err(SwapError::Corrupt("header checksum mismatch".into()));
    }
    let mut sections = Vec::with_capacity(n_layers as usize);
    let mut expect = data_start;
    let mut stored_bytes = 0;
    for l in 0..n_layers as usize {
        let e = V1_FIXED_LEN + V1_ENTRY_LEN * l;
        let offset = le_u64(b, e);
        let stored = u64::from(le_u32(b, e + 8));
        let raw = u64::from(le_u32(b, e + 12));
        let crc = le_u32(b, e + 16);
        if offset != expect {
            return Err(SwapError::Corrupt(format!(
                "layer {l} block at offset {offset}, expected {expect}"
            )));
        }
        let what = || format!("layer {l}");
        let end = check_section(&what, offset, stored, raw, true, file_len)?;
        sections.push(Section {
            offset: offset as usize,
            stored: stored as usize,
            raw: raw as usize,
            crc,
            lz4: true,
        });
        stored_bytes += stored;
        expect = end;
    }
    if expect != file_len {
        return Err(SwapError::Corrupt(format!(
            "{} trailing bytes after the last layer",
            file_len - expect
        )));
    }
    Ok(Head::Parsed(Parsed {
        version: VERSION_1,
        shape_hash,
        items: vec![Item {
            header,
            first: 0,
            stored_bytes,
        }],
        sections,
    }))
}

impl SwapFile {
    /// Opens `path` and reads its header and tables, validating the table crc and every
    /// section's length against the file size. Sections are read when asked for, so opening
    /// a large segment to read a few of its chunks costs only those.
    pub fn open(path: &Path) -> Result<Self, SwapError> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut head = vec![0u8; file_len.min(HEAD_READ as u64) as usize];
        file.read_exact_at(&mut head, 0)?;
        let p = match parse(&head, file_len)? {
            Head::Parsed(p) => p,
            Head::Need(n) => {
                head.resize(n, 0);
                file.read_exact_at(&mut head[HEAD_READ..], HEAD_READ as u64)?;
                match parse(&head, file_len)? {
                    Head::Parsed(p) => p,
                    Head::Need(_) => {
                        return Err(SwapError::Corrupt("header length changed".into()));
                    }
                }
            }
        };
        Ok(SwapFile {
            file,
            file_len,
            version: p.version,
            shape_hash: p.shape_hash,
            items: p.items,
            sections: p.sections,
        })
    }

    /// Like [`SwapFile::open`], and rejects a file written for another model/KV shape.
    pub fn open_for_shape(path: &Path, shape_hash: u64) -> Result<Self, SwapError> {
        let f = Self::open(path)?;
        if f.shape_hash != shape_hash {
            return Err(SwapError::ShapeMismatch {
                expected: shape_hash,
                found: f.shape_hash,
            });
        }
        Ok(f)
    }

    /// The format version of the file (1: one chunk per file; 2: segment).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn shape_hash(&self) -> u64 {
        self.shape_hash
    }

    /// Size of the file on disk, in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.file_len
    }

    pub fn n_items(&self) -> usize {
        self.items.len()
    }

    fn item_entry(&self, item: usize) -> Result<&Item, SwapError> {
        self.items.get(item).ok_or(SwapError::ItemOutOfRange {
            item,
            n_items: self.items.len(),
        })
    }

    pub fn item(&self, item: usize) -> Result<ItemHeader, SwapError> {
        Ok(self.item_entry(item)?.header)
    }

    /// Bytes item `item`'s sections take in the file.
    pub fn item_bytes(&self, item: usize) -> Result<u64, SwapError> {
        Ok(self.item_entry(item)?.stored_bytes)
    }

    fn section(&self, item: usize, section: usize) -> Result<Section, SwapError> {
        let it = self.item_entry(item)?;
        let n = it.header.n_sections as usize;
        if section >= n {
            return Err(SwapError::SectionOutOfRange {
                item,
                section,
                n_sections: n,
            });
        }
        self.sections
            .get(it.first + section)
            .copied()
            .ok_or(SwapError::Truncated)
    }

    /// Raw (uncompressed) length of a section, or None if out of range.
    pub fn section_raw_len(&self, item: usize, section: usize) -> Option<usize> {
        self.section(item, section).ok().map(|s| s.raw)
    }

    /// Where a section's stored bytes are in the file.
    pub fn section_range(&self, item: usize, section: usize) -> Option<std::ops::Range<u64>> {
        let s = self.section(item, section).ok()?;
        Some(s.offset as u64..(s.offset + s.stored) as u64)
    }

    /// A section's bytes, decompressed if need be and checked against its crc.
    pub fn read_section(&self, item: usize, section: usize) -> Result<Box<[u8]>, SwapError> {
        let s = self.section(item, section)?;
        let stored = self.read_stored(&[s])?.pop().unwrap_or_default();
        let out: Box<[u8]> = if s.lz4 {
            let mut out = vec![0u8; s.raw].into_boxed_slice();
            decompress(&stored, &mut out, item, section)?;
            out
        } else {
            stored.into_boxed_slice()
        };
        check_crc(&out, s.crc, item, section)?;
        Ok(out)
    }

    /// Every section of item `item`, each checked against its crc. An item's sections are
    /// stored back to back, so when none is compressed this is one vectored read straight
    /// into the buffers returned.
    pub fn read_item(&self, item: usize) -> Result<Vec<Box<[u8]>>, SwapError> {
        self.read_item_with(item, Vec::with_capacity)
    }

    /// Like [`Self::read_item`], reading each section into the buffer `buffer(len)` gives
    /// (its content is overwritten; a recycled buffer of exactly `len` bytes saves an
    /// allocation and the page faults of fresh memory).
    pub fn read_item_with(
        &self,
        item: usize,
        mut buffer: impl FnMut(usize) -> Vec<u8>,
    ) -> Result<Vec<Box<[u8]>>, SwapError> {
        let it = self.item_entry(item)?;
        let n = it.header.n_sections as usize;
        let secs = self
            .sections
            .get(it.first..it.first + n)
            .ok_or(SwapError::Truncated)?;
        if secs.iter().any(|s| s.lz4) {
            return (0..n).map(|s| self.read_section(item, s)).collect();
        }
        let bufs = self.read_stored_into(secs, secs.iter().map(|s| buffer(s.stored)).collect())?;
        bufs.into_iter()
            .zip(secs)
            .enumerate()
            .map(|(k, (b, s))| {
                check_crc(&b, s.crc, item, k)?;
                Ok(b.into_boxed_slice())
            })
            .collect()
    }

    /// Like [`Self::read_section`], into `out`, which must be exactly the section's raw
    /// length. On error the content of `out` is unspecified.
    pub fn read_section_into(
        &self,
        item: usize,
        section: usize,
        out: &mut [u8],
    ) -> Result<(), SwapError> {
        let s = self.section(item, section)?;
        if out.len() != s.raw {
            return Err(SwapError::BufferSize {
                item,
                section,
                expected: s.raw,
                got: out.len(),
            });
        }
        if s.lz4 {
            let stored = self.read_stored(&[s])?.pop().unwrap_or_default();
            decompress(&stored, out, item, section)?;
        } else {
            self.file
                .read_exact_at(out, s.offset as u64)
                .map_err(eof_is_truncation)?;
        }
        check_crc(out, s.crc, item, section)
    }

    /// The stored bytes of `secs`, which lie back to back in the file, each in a buffer of
    /// its own; read with as few `preadv` calls as the kernel allows, without zeroing the
    /// buffers first.
    fn read_stored(&self, secs: &[Section]) -> Result<Vec<Vec<u8>>, SwapError> {
        self.read_stored_into(
            secs,
            secs.iter().map(|s| Vec::with_capacity(s.stored)).collect(),
        )
    }

    /// [`Self::read_stored`] into the given buffers (one per section; their content is
    /// replaced).
    fn read_stored_into(
        &self,
        secs: &[Section],
        mut bufs: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, SwapError> {
        let Some(first) = secs.first() else {
            return Ok(Vec::new());
        };
        bufs.resize_with(secs.len(), Vec::new);
        bufs.truncate(secs.len());
        for (b, s) in bufs.iter_mut().zip(secs) {
            b.clear();
            b.reserve_exact(s.stored);
        }
        let total: usize = secs.iter().map(|s| s.stored).sum();
        let mut done = 0usize;
        while done < total {
            // The unread rest: whole buffers after a partly read one.
            let mut iov = Vec::with_capacity(bufs.len().min(MAX_IOV));
            let mut skip = done;
            for (b, s) in bufs.iter_mut().zip(secs) {
                if skip >= s.stored {
                    skip -= s.stored;
                    continue;
                }
                // SAFETY: `skip < s.stored ≤ b.capacity()`, so the pointer stays inside the
                // buffer's allocation.
                let base = unsafe { b.as_mut_ptr().add(skip) };
                iov.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: s.stored - skip,
                });
                skip = 0;
                if iov.len() == MAX_IOV {
                    break;
                }
            }
            let at = libc::off_t::try_from(first.offset as u64 + done as u64)
                .map_err(|_| SwapError::Corrupt("offset out of range".into()))?;
            // SAFETY: every iovec points into the spare capacity of a buffer we own and
            // hold mutably here, with a length that stays within it; `preadv` writes at most
            // that many bytes to each and nothing else. The count fits in c_int (≤ MAX_IOV).
            let r = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    at,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if r == 0 {
                // The file ends before its table says: it changed under us.
                return Err(SwapError::Truncated);
            }
            done += r as usize;
        }
        for (b, s) in bufs.iter_mut().zip(secs) {
            // SAFETY: `preadv` fills its buffers in order and all `total` bytes were read,
            // so the first `s.stored` bytes of every buffer are initialised.
            unsafe { b.set_len(s.stored) };
        }
        Ok(bufs)
    }
}

fn eof_is_truncation(e: std::io::Error) -> SwapError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        SwapError::Truncated
    } else {
        SwapError::Io(e)
    }
}

fn decompress(src: &[u8], out: &mut [u8], item: usize, section: usize) -> Result<(), SwapError> {
    let n = lz4_flex::block::decompress_into(src, out)
        .map_err(|err| SwapError::Corrupt(format!("item {item} section {section}: lz4: {err}")))?;
    if n != out.len() {
        return Err(SwapError::Corrupt(format!(
            "item {item} section {section}: decoded {n} bytes, expected {}",
            out.len()
        )));
    }
    Ok(())
}

fn check_crc(b: &[u8], crc: u32, item: usize, section: usize) -> Result<(), SwapError> {
    if crc32fast::hash(b) != crc {
        return Err(SwapError::Checksum { item, section });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::durable::tmp_path;
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Instant;

    const HASH: u64 = 0x0123_4567_89ab_cdef;

    fn item<'a>(precision: u8, sections: &'a [Vec<u8>]) -> ItemSpec<'a> {
        ItemSpec {
            precision,
            kind: 0,
            n_tokens: 16,
            sections: sections.iter().map(Vec::as_slice).collect(),
        }
    }

    fn write(path: &Path, items: &[ItemSpec]) -> Written {
        write_segment(path, HASH, items, &mut |_, _| {}).unwrap()
    }

    /// Sections of mixed nature: compressible, incompressible, empty, tiny, repetitive.
    fn sample_sections(seed: u64) -> Vec<Vec<u8>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let random: Vec<u8> = (0..3000).map(|_| rng.gen()).collect();
        let nibbles: Vec<u8> = (0..2048).map(|_| rng.gen_range(6u8..10) * 17).collect();
        vec![
            random,
            Vec::new(),
            nibbles,
            vec![7u8],
            vec![0u8; 5000],
            Vec::new(),
            (0..1000u32).map(|i| (i % 251) as u8).collect(),
        ]
    }

    /// Every section of every item (odd items with one vectored read, even ones section by
    /// section, so damage is checked through both paths).
    fn read_all(f: &SwapFile) -> Result<Vec<Vec<Box<[u8]>>>, SwapError> {
        (0..f.n_items())
            .map(|i| {
                if i % 2 == 1 {
                    return f.read_item(i);
                }
                let n = f.item(i)?.n_sections as usize;
                (0..n).map(|s| f.read_section(i, s)).collect()
            })
            .collect()
    }

    /// A compressible first section makes the item lz4 where lz4 pays; an incompressible
    /// one stores the whole item as is.
    fn compressible(seed: u64) -> Vec<Vec<u8>> {
        let mut v = sample_sections(seed);
        v.swap(0, 4);
        v
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f1.kv");
        let a = compressible(1);
        let b = sample_sections(2);
        let c = vec![vec![9u8; 100]];
        let items = [
            item(16, &a),
            item(4, &b),
            ItemSpec {
                precision: 0,
                kind: 1,
                n_tokens: 3,
                sections: c.iter().map(Vec::as_slice).collect(),
            },
        ];
        let w = write(&path, &items);
        assert_eq!(w.file_bytes, std::fs::metadata(&path).unwrap().len());
        assert!(!tmp_path(&path).exists(), "tmp file left behind");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let f = SwapFile::open(&path).unwrap();
        assert_eq!(f.version(), VERSION);
        assert_eq!(f.shape_hash(), HASH);
        assert_eq!(f.file_bytes(), w.file_bytes);
        assert_eq!(f.n_items(), 3);
        for (i, (spec, want)) in items.iter().zip([&a, &b, &c]).enumerate() {
            let h = f.item(i).unwrap();
            assert_eq!(
                (h.precision, h.kind, h.n_tokens, h.n_sections as usize),
                (spec.precision, spec.kind, spec.n_tokens, want.len())
            );
            assert_eq!(f.item_bytes(i).unwrap(), w.item_bytes[i]);
            let whole: Vec<Box<[u8]>> = f.read_item(i).unwrap();
            assert_eq!(whole.len(), want.len());
            for (g, w) in whole.iter().zip(want.iter()) {
                assert_eq!(&**g, w.as_slice());
            }
            // Reused buffers (stale content, too small, too large) read the same bytes.
            let mut lent = 0;
            let reused = f
                .read_item_with(i, |len| {
                    lent += 1;
                    match lent % 3 {
                        0 => vec![0xEE; len],
                        1 => vec![0x11; len / 2 + 1],
                        _ => vec![0x77; len + 9],
                    }
                })
                .unwrap();
            assert_eq!(reused, whole);
            for (s, want) in want.iter().enumerate() {
                assert_eq!(f.section_raw_len(i, s), Some(want.len()));
                assert_eq!(&*f.read_section(i, s).unwrap(), want.as_slice());
                let mut buf = vec![0xAAu8; want.len()];
                f.read_section_into(i, s, &mut buf).unwrap();
                assert_eq!(&buf, want);
            }
        }
        // The compressible item shrank; the incompressible one is stored as is.
        let raw = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>() as u64;
        assert!(w.item_bytes[0] * 4 < raw(&a) * 3, "{w:?}");
        assert_eq!(w.item_bytes[1], raw(&b));
        // Sections can be read in any order, repeatedly.
        assert_eq!(&*f.read_section(1, 2).unwrap(), b[2].as_slice());
        assert_eq!(&*f.read_section(0, 4).unwrap(), a[4].as_slice());
        // Items follow each other, sections in order.
        let r = f.section_range(1, 0).unwrap();
        assert_eq!(r.end - r.start, b[0].len() as u64);
        assert_eq!(f.section_range(1, 1).unwrap().start, r.end);
        assert!(f.section_range(1, 7).is_none());
    }

    #[test]
    fn empty_segment_and_pacing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.kv");
        let w = write(&path, &[]);
        assert_eq!(w.file_bytes, (FIXED_LEN + CRC_LEN) as u64);
        let f = SwapFile::open(&path).unwrap();
        assert_eq!(f.n_items(), 0);
        assert!(matches!(
            f.item(0),
            Err(SwapError::ItemOutOfRange {
                item: 0,
                n_items: 0
            })
        ));
        // pace sees every section of every item, in order, before it is written.
        let s = sample_sections(3);
        let mut seen = Vec::new();
        write_segment(&path, HASH, &[item(4, &s), item(2, &s)], &mut |i, k| {
            seen.push((i, k))
        })
        .unwrap();
        let expected: Vec<(usize, usize)> = (0..2)
            .flat_map(|i| (0..s.len()).map(move |k| (i, k)))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn overwrite_replaces_and_an_open_file_keeps_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let a = vec![vec![1u8; 4000]];
        let b = vec![vec![2u8; 300]];
        write(&path, &[item(4, &a)]);
        let old = SwapFile::open(&path).unwrap();
        // A stale tmp from a crash, with a loose mode, must not leak its mode into the file.
        std::fs::write(tmp_path(&path), b"junk").unwrap();
        std::fs::set_permissions(tmp_path(&path), std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, &[item(4, &b)]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp_path(&path).exists());
        let new = SwapFile::open(&path).unwrap();
        assert_eq!(&*new.read_section(0, 0).unwrap(), &b[0][..]);
        assert_eq!(&*old.read_section(0, 0).unwrap(), &a[0][..]);
        // Deleting the file leaves an open file readable too.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&*new.read_section(0, 0).unwrap(), &b[0][..]);
    }

    #[test]
    fn errors_on_bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let a = vec![vec![1u8, 2, 3]];
        write(&path, &[item(4, &a)]);
        let f = SwapFile::open(&path).unwrap();
        assert!(matches!(
            f.read_section(0, 1),
            Err(SwapError::SectionOutOfRange {
                item: 0,
                section: 1,
                n_sections: 1
            })
        ));
        assert!(matches!(
            f.read_section(1, 0),
            Err(SwapError::ItemOutOfRange {
                item: 1,
                n_items: 1
            })
        ));
        assert!(f.section_raw_len(0, 1).is_none());
        let mut small = [0u8; 2];
        assert!(matches!(
            f.read_section_into(0, 0, &mut small),
            Err(SwapError::BufferSize {
                item: 0,
                section: 0,
                expected: 3,
                got: 2
            })
        ));
        assert!(matches!(
            SwapFile::open(&dir.path().join("missing.kv")),
            Err(SwapError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound
        ));
        assert!(SwapFile::open_for_shape(&path, HASH).is_ok());
        assert!(matches!(
            SwapFile::open_for_shape(&path, 42),
            Err(SwapError::ShapeMismatch { expected: 42, .. })
        ));
    }

    #[test]
    fn bad_magic_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let s = vec![b"hello hello hello".to_vec()];
        write(&path, &[item(4, &s)]);
        let good = std::fs::read(&path).unwrap();

        let mut b = good.clone();
        b[0..8].copy_from_slice(b"GGUF\0\0\0\0");
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(SwapFile::open(&path), Err(SwapError::BadMagic)));

        let mut b = good.clone();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(
            SwapFile::open(&path),
            Err(SwapError::UnsupportedVersion(3))
        ));

        std::fs::write(&path, b"").unwrap();
        assert!(matches!(SwapFile::open(&path), Err(SwapError::Truncated)));
        std::fs::write(&path, b"LLM").unwrap();
        assert!(matches!(SwapFile::open(&path), Err(SwapError::Truncated)));
        std::fs::write(&path, b"xyz").unwrap();
        assert!(matches!(SwapFile::open(&path), Err(SwapError::BadMagic)));
    }

    /// The one-chunk files of version 1, as earlier builds wrote them.
    fn write_v1(path: &Path, precision: u8, layers: &[Vec<u8>]) {
        let n = layers.len();
        let data_start = V1_FIXED_LEN + V1_ENTRY_LEN * n + CRC_LEN;
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION_1.to_le_bytes());
        head.push(precision);
        head.push(0);
        head.extend_from_slice(&16u16.to_le_bytes());
        head.extend_from_slice(&HASH.to_le_bytes());
        head.extend_from_slice(&(n as u32).to_le_bytes());
        let mut blocks = Vec::new();
        for raw in layers {
            let c = lz4_flex::block::compress(raw);
            head.extend_from_slice(&((data_start + blocks.len()) as u64).to_le_bytes());
            head.extend_from_slice(&(c.len() as u32).to_le_bytes());
            head.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            head.extend_from_slice(&crc32fast::hash(raw).to_le_bytes());
            blocks.extend_from_slice(&c);
        }
        let crc = crc32fast::hash(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        head.extend_from_slice(&blocks);
        std::fs::write(path, head).unwrap();
    }

    #[test]
    fn version_1_files_read_as_one_item() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f7.kv");
        let layers = sample_sections(5);
        write_v1(&path, 8, &layers);
        let f = SwapFile::open_for_shape(&path, HASH).unwrap();
        assert_eq!(f.version(), VERSION_1);
        assert_eq!(f.n_items(), 1);
        let h = f.item(0).unwrap();
        assert_eq!((h.precision, h.kind, h.n_tokens), (8, 0, 16));
        assert_eq!(h.n_sections as usize, layers.len());
        let got = read_all(&f).unwrap();
        for (g, w) in got[0].iter().zip(&layers) {
            assert_eq!(&**g, w.as_slice());
        }
        // Damage in a version 1 file is caught too.
        let good = std::fs::read(&path).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut b = good.clone();
            b[i] ^= 0xFF;
            std::fs::write(&path, &b).unwrap();
            if let Ok(got) = SwapFile::open(&path).and_then(|f| read_all(&f)) {
                for (g, w) in got[0].iter().zip(&layers) {
                    assert_eq!(&**g, w.as_slice(), "byte {i}");
                }
            }
        }
    }

    fn small_file() -> (tempfile::TempDir, Vec<u8>, Vec<Vec<Vec<u8>>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let items = vec![
            vec![
                (0..40).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>(),
                Vec::new(),
            ],
            vec![
                b"abcabcabcabcabcabcabcabcabcabcabcabcabcabcXYZ".to_vec(),
                (0..60).map(|_| rng.gen_range(0u8..4)).collect(),
            ],
            vec![(0..30).map(|_| rng.gen::<u8>()).collect()],
        ];
        let specs: Vec<ItemSpec> = items.iter().map(|s| item(4, s)).collect();
        write(&path, &specs);
        let bytes = std::fs::read(&path).unwrap();
        (dir, bytes, items)
    }

    /// Opens `bytes` as a swap file and reads every section; Ok only if all succeed.
    fn open_and_read_all(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<Box<[u8]>>>, SwapError> {
        std::fs::write(path, bytes)?;
        read_all(&SwapFile::open(path)?)
    }

    fn header_len(items: &[Vec<Vec<u8>>]) -> usize {
        let sections: usize = items.iter().map(Vec::len).sum();
        FIXED_LEN + ITEM_LEN * items.len() + SECTION_LEN * sections
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (dir, good, items) = small_file();
        let path = dir.path().join("flip.kv");
        let all = open_and_read_all(&path, &good).unwrap();
        assert_eq!(all.len(), items.len());
        let mut benign = 0usize;
        for i in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xFF, 0x5A] {
                let mut b = good.clone();
                b[i] ^= mask;
                match open_and_read_all(&path, &b) {
                    Err(e) => assert!(e.is_corrupt(), "byte {i} ^ {mask:#x}: {e}"),
                    // An lz4 block can have two encodings of the same bytes (e.g. a match
                    // offset of 3 or 6 into "abcabc..."); that is not wrong data.
                    Ok(got) => {
                        assert!(i >= header_len(&items) + CRC_LEN, "header byte {i}");
                        assert_eq!(got, all, "byte {i} ^ {mask:#x} gave wrong data");
                        benign += 1;
                    }
                }
            }
        }
        println!(
            "flips: {} tried, {benign} decoded to the same bytes",
            good.len() * 4
        );
    }

    #[test]
    fn a_damaged_section_spoils_only_itself() {
        let (dir, good, items) = small_file();
        let path = dir.path().join("one.kv");
        // The last byte belongs to item 2's only section (stored as is).
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 0x10;
        std::fs::write(&path, &b).unwrap();
        let f = SwapFile::open(&path).unwrap();
        assert!(matches!(
            f.read_section(2, 0),
            Err(SwapError::Checksum {
                item: 2,
                section: 0
            })
        ));
        assert!(matches!(
            f.read_item(2),
            Err(SwapError::Checksum {
                item: 2,
                section: 0
            })
        ));
        for (i, secs) in items.iter().enumerate().take(2) {
            for (s, want) in secs.iter().enumerate() {
                assert_eq!(&*f.read_section(i, s).unwrap(), want.as_slice());
            }
            assert_eq!(f.read_item(i).unwrap().len(), secs.len());
        }
        // A file cut short after it was opened reads as truncated, never as short data.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(b.len() as u64 - 10)
            .unwrap();
        assert!(matches!(f.read_item(2), Err(SwapError::Truncated)));
        let mut buf = vec![0u8; items[2][0].len()];
        assert!(matches!(
            f.read_section_into(2, 0, &mut buf),
            Err(SwapError::Truncated)
        ));
    }

    #[test]
    fn every_truncation_is_detected() {
        let (dir, good, _) = small_file();
        let path = dir.path().join("trunc.kv");
        for len in 0..good.len() {
            let r = open_and_read_all(&path, &good[..len]);
            assert!(
                r.is_err(),
                "truncation to {len} of {} went undetected",
                good.len()
            );
        }
        // Trailing garbage is rejected too.
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Corrupt(_))
        ));
    }

    #[test]
    fn crafted_table_with_valid_crc_is_rejected() {
        // Someone who recomputes the header crc still cannot point outside the file or
        // make us allocate absurd amounts.
        let (dir, good, items) = small_file();
        let path = dir.path().join("crafted.kv");
        let table_end = header_len(&items);
        let patch = |b: &mut Vec<u8>| {
            let crc = crc32fast::hash(&b[..table_end]);
            b[table_end..table_end + 4].copy_from_slice(&crc.to_le_bytes());
        };
        let sections_at = FIXED_LEN + ITEM_LEN * items.len();
        // Huge raw length on the first section (stored < raw: an lz4 block that expands
        // absurdly).
        let mut b = good.clone();
        b[sections_at + 4..sections_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        patch(&mut b);
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Corrupt(_))
        ));
        // Stored longer than raw.
        let mut b = good.clone();
        b[sections_at + 4..sections_at + 8].copy_from_slice(&1u32.to_le_bytes());
        patch(&mut b);
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Corrupt(_))
        ));
        // Huge stored length.
        let mut b = good.clone();
        b[sections_at..sections_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        b[sections_at + 4..sections_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        patch(&mut b);
        assert!(open_and_read_all(&path, &b).is_err());
        // Item section counts that do not add up.
        let mut b = good.clone();
        b[FIXED_LEN + 4..FIXED_LEN + 8].copy_from_slice(&3u32.to_le_bytes());
        patch(&mut b);
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Corrupt(_))
        ));
        // n_items / n_sections = u32::MAX.
        let mut b = good.clone();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Truncated)
        ));
        let mut b = good.clone();
        b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Truncated)
        ));
        // A wrong raw length of a stored section → the lengths no longer add up or the
        // section turns into a bogus lz4 block; never wrong data.
        let mut b = good.clone();
        let e = sections_at + SECTION_LEN * 4 + 4;
        let raw = le_u32(&b, e);
        b[e..e + 4].copy_from_slice(&(raw + 1).to_le_bytes());
        patch(&mut b);
        assert!(open_and_read_all(&path, &b).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fuzz.kv");
            let _ = open_and_read_all(&path, &bytes);
        }

        #[test]
        fn arbitrary_bytes_after_magic_never_panic(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fuzz.kv");
            let mut bytes = MAGIC.to_vec();
            let version = if v2 { VERSION } else { VERSION_1 };
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = open_and_read_all(&path, &bytes);
        }

        /// Mutations of a valid file, with the header crc fixed up so the table parser and
        /// the lz4 decoder see the damage, never return wrong data and never panic.
        #[test]
        fn mutated_valid_files_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            fix_crc in any::<bool>(),
        ) {
            let (dir, good, items) = small_file();
            let path = dir.path().join("fuzz.kv");
            let mut b = good.clone();
            for (i, v) in &edits {
                let i = i.index(b.len());
                b[i] = *v;
            }
            let table_end = header_len(&items);
            if fix_crc {
                let crc = crc32fast::hash(&b[..table_end]);
                b[table_end..table_end + 4].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(got) = open_and_read_all(&path, &b) {
                // Accepted only if the decoded data is the original data (each section's
                // crc was checked against the original table).
                prop_assert_eq!(got.len(), items.len());
                for (g, w) in got.iter().zip(&items) {
                    prop_assert_eq!(g.len(), w.len());
                    for (gs, ws) in g.iter().zip(w) {
                        prop_assert_eq!(&**gs, ws.as_slice());
                    }
                }
            }
        }
    }

    /// int4-like KV bytes: groups of 32 values as 16 bytes of nibbles (roughly normal around
    /// the middle of the range, like quantized activations) + f16 scale + f16 offset.
    fn int4_like_layer(rng: &mut impl Rng, bytes: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes);
        while out.len() + 20 <= bytes {
            for _ in 0..16 {
                let mut q = || {
                    // Sum of 4 uniforms ≈ normal; centred at 7.5, clipped to 0..=15.
                    let s: f32 = (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0;
                    (7.5 + s * 5.0).round().clamp(0.0, 15.0) as u8
                };
                let lo = q();
                let hi = q();
                out.push(lo | (hi << 4));
            }
            let scale = half::f16::from_f32(0.02 + rng.gen::<f32>() * 0.01);
            let offset = half::f16::from_f32(-0.15 - rng.gen::<f32>() * 0.05);
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out.resize(bytes, 0);
        out
    }

    /// One segment of 64 chunks against 64 one-chunk files: what a restore pays to open and
    /// read them back (page cache warm).
    #[test]
    fn throughput() {
        const CHUNKS: usize = 64;
        const LAYERS: usize = 30;
        const LAYER_BYTES: usize = 4032; // SmolLM2 int4
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        let chunks: Vec<Vec<Vec<u8>>> = (0..CHUNKS)
            .map(|_| {
                (0..LAYERS)
                    .map(|_| int4_like_layer(&mut rng, LAYER_BYTES))
                    .collect()
            })
            .collect();
        let raw_total = (CHUNKS * LAYERS * LAYER_BYTES) as f64;
        let mb = |bytes: f64, secs: f64| bytes / secs / 1e6;

        let seg = dir.path().join("seg.kv");
        let specs: Vec<ItemSpec> = chunks.iter().map(|c| item(4, c)).collect();
        let t = Instant::now();
        let w = write(&seg, &specs);
        let write_seg_s = t.elapsed().as_secs_f64();
        let paths: Vec<PathBuf> = (0..CHUNKS)
            .map(|i| dir.path().join(format!("{i}.kv")))
            .collect();
        let t = Instant::now();
        for (p, s) in paths.iter().zip(&specs) {
            write(p, std::slice::from_ref(s));
        }
        let write_files_s = t.elapsed().as_secs_f64();

        let mut best_seg = f64::MAX;
        let mut best_files = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let f = SwapFile::open(&seg).unwrap();
            for i in 0..CHUNKS {
                std::hint::black_box(f.read_item(i).unwrap());
            }
            drop(f);
            best_seg = best_seg.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for p in &paths {
                let f = SwapFile::open(p).unwrap();
                std::hint::black_box(f.read_item(0).unwrap());
            }
            best_files = best_files.min(t.elapsed().as_secs_f64());
        }
        let f = SwapFile::open(&seg).unwrap();
        assert_eq!(&*f.read_section(5, 9).unwrap(), chunks[5][9].as_slice());
        println!(
            "kvstore swapfile throughput: {CHUNKS} chunks × {LAYERS} layers × {LAYER_BYTES} B \
             = {:.1} MB raw, {:.1} MB on disk (ratio {:.3})",
            raw_total / 1e6,
            w.file_bytes as f64 / 1e6,
            w.file_bytes as f64 / raw_total
        );
        println!(
            "  write: one segment {:.1} ms, one file per chunk {:.1} ms",
            write_seg_s * 1e3,
            write_files_s * 1e3
        );
        println!(
            "  open + read all (page cache warm): one segment {:.2} ms ({:.0} MB/s), \
             one file per chunk {:.2} ms ({:.0} MB/s)",
            best_seg * 1e3,
            mb(raw_total, best_seg),
            best_files * 1e3,
            mb(raw_total, best_files)
        );
    }
}
