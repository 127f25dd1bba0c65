//! Swap files: one file per KV chunk (16 tokens × all layers), read back layer by layer.
//!
//! # File layout (version 1, all integers little-endian)
//!
//! | offset        | size   | field                                                    |
//! |---------------|--------|----------------------------------------------------------|
//! | 0             | 8      | magic `b"LLMSDKV1"`                                      |
//! | 8             | 4      | `u32` format version (= 1)                               |
//! | 12            | 1      | `u8` precision tag                                       |
//! | 13            | 1      | `u8` kind (0 = sealed chunk, 1 = raw f32 staged tail)     |
//! | 14            | 2      | `u16` n_tokens                                           |
//! | 16            | 8      | `u64` shape_hash (model/KV shape; rejects foreign files) |
//! | 24            | 4      | `u32` n_layers                                           |
//! | 28            | 20 × n | layer table, per layer: `u64` offset of its block,       |
//! |               |        | `u32` compressed length, `u32` raw length,               |
//! |               |        | `u32` crc32 of the raw (uncompressed) bytes              |
//! | 28 + 20n      | 4      | `u32` crc32 of bytes `0 .. 28 + 20n` (header and table)  |
//! | 32 + 20n      | ...    | the layers' lz4 blocks, in order, back to back           |
//!
//! Each layer is an independent lz4 *block* (`lz4_flex::block`, no frame, no size prefix),
//! so layer `l` can be decompressed alone. The reader accepts only this exact shape: the
//! first block starts right after the header crc, each block starts where the previous one
//! ends, and the file ends where the last block ends. Anything else (a short file, trailing
//! bytes, an offset or length out of range, a raw length no lz4 block could expand to) is an
//! error on [`ChunkFile::open`]; a damaged block is an error on [`ChunkFile::read_layer`]
//! (lz4 decode failure, wrong decoded length, or crc mismatch). No input makes either panic.
//!
//! Files are written to `<path>.tmp` (mode 0600), fsynced and renamed into place, so a
//! reader never sees a partly written file under the final name.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use super::durable::write_file_atomic;

/// The first 8 bytes of every chunk file.
pub const MAGIC: [u8; 8] = *b"LLMSDKV1";
/// The format version this module writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the layer table.
const FIXED_LEN: usize = 28;
/// Bytes per layer-table entry.
const ENTRY_LEN: usize = 20;
/// Bytes of the header/table crc.
const CRC_LEN: usize = 4;
/// An lz4 block expands at most ~255× (each extra match-length byte adds 255 output bytes);
/// a table claiming more is corrupt, and we refuse to allocate for it.
const MAX_LZ4_RATIO: u64 = 256;
/// Slack for tiny blocks (an empty input still compresses to one token byte).
const LZ4_RATIO_SLACK: u64 = 64;

/// Why a chunk file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("swap file I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a chunk file (bad magic)")]
    BadMagic,
    #[error("unsupported chunk file version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("chunk file is truncated")]
    Truncated,
    #[error("chunk file is corrupt: {0}")]
    Corrupt(String),
    #[error("chunk file layer {layer} fails its checksum")]
    Checksum { layer: usize },
    #[error("layer {layer} out of range (chunk has {n_layers} layers)")]
    LayerOutOfRange { layer: usize, n_layers: usize },
    #[error("output buffer for layer {layer} is {got} bytes, the layer has {expected}")]
    BufferSize {
        layer: usize,
        expected: usize,
        got: usize,
    },
    #[error(
        "chunk file is for another model/KV shape (hash {found:#018x}, expected {expected:#018x})"
    )]
    ShapeMismatch { expected: u64, found: u64 },
    #[error("cannot write chunk: {0}")]
    InvalidInput(String),
}

impl SwapError {
    /// True when the file's *content* is bad (as opposed to an I/O failure, a caller mistake
    /// or a file from another model): the chunk should be recomputed and the file deleted.
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

/// What a chunk file says about its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Precision tag of the quantized bytes (meaning owned by the KV store).
    pub precision: u8,
    /// [`ChunkHeader::KIND_SEALED`] or [`ChunkHeader::KIND_STAGED_F32`] (not interpreted here).
    pub kind: u8,
    pub n_tokens: u16,
    pub n_layers: u32,
    /// Hash of the model/KV shape; a file with another hash belongs to another model.
    pub shape_hash: u64,
}

impl ChunkHeader {
    /// A sealed (full, quantized) chunk.
    pub const KIND_SEALED: u8 = 0;
    /// The raw f32 staged tail of a context.
    pub const KIND_STAGED_F32: u8 = 1;
}

fn u32_len(what: &str, l: usize, n: usize) -> Result<u32, SwapError> {
    u32::try_from(n).map_err(|_| {
        SwapError::InvalidInput(format!("layer {l}: {what} {n} bytes does not fit in u32"))
    })
}

/// Writes a chunk file atomically: to `path` + ".tmp", lz4 block-compressed per layer (each
/// layer independently so a reader can decompress layer l alone), crc32 of each layer's
/// *uncompressed* bytes and of the header/table, fsync the file, rename into place, mode
/// 0600. Returns the file's size in bytes. Does NOT fsync the directory (see
/// [`super::durable::sync_dir`]) so a caller writing many chunks can fsync the directory once.
///
/// `header.n_layers` must equal `layers.len()`.
pub fn write_chunk(path: &Path, header: &ChunkHeader, layers: &[&[u8]]) -> Result<u64, SwapError> {
    let n = layers.len();
    if u32::try_from(n).ok() != Some(header.n_layers) {
        return Err(SwapError::InvalidInput(format!(
            "header says {} layers, {} given",
            header.n_layers, n
        )));
    }
    let data_start = FIXED_LEN + ENTRY_LEN * n + CRC_LEN;
    let mut head = Vec::with_capacity(data_start);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.push(header.precision);
    head.push(header.kind);
    head.extend_from_slice(&header.n_tokens.to_le_bytes());
    head.extend_from_slice(&header.shape_hash.to_le_bytes());
    head.extend_from_slice(&header.n_layers.to_le_bytes());

    let max_blocks: usize = layers
        .iter()
        .map(|l| lz4_flex::block::get_maximum_output_size(l.len()))
        .sum();
    let mut blocks = vec![0u8; max_blocks];
    let mut used = 0usize;
    for (l, raw) in layers.iter().enumerate() {
        let raw_len = u32_len("raw length", l, raw.len())?;
        let comp = lz4_flex::block::compress_into(raw, &mut blocks[used..])
            .map_err(|e| SwapError::InvalidInput(format!("layer {l}: lz4: {e}")))?;
        let comp_len = u32_len("compressed length", l, comp)?;
        let offset = (data_start + used) as u64;
        head.extend_from_slice(&offset.to_le_bytes());
        head.extend_from_slice(&comp_len.to_le_bytes());
        head.extend_from_slice(&raw_len.to_le_bytes());
        head.extend_from_slice(&crc32fast::hash(raw).to_le_bytes());
        used += comp;
    }
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(head.len(), data_start);
    Ok(write_file_atomic(path, &[&head, &blocks[..used]])?)
}

/// One layer's block, validated against the file size on open.
#[derive(Clone, Copy, Debug)]
struct LayerEntry {
    offset: usize,
    comp_len: usize,
    raw_len: usize,
    crc: u32,
}

/// An open chunk file, mapped read-only; header and layer table validated on open.
pub struct ChunkFile {
    map: Mmap,
    header: ChunkHeader,
    layers: Vec<LayerEntry>,
}

impl std::fmt::Debug for ChunkFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkFile")
            .field("header", &self.header)
            .field("file_bytes", &self.map.len())
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

/// Validates a whole file image and returns its header and layer table.
/// Every index below is checked against `b.len()` first, so this never panics.
fn parse(b: &[u8]) -> Result<(ChunkHeader, Vec<LayerEntry>), SwapError> {
    let file_len = b.len() as u64;
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
    let version = le_u32(b, 8);
    if version != VERSION {
        return Err(SwapError::UnsupportedVersion(version));
    }
    if b.len() < FIXED_LEN {
        return Err(SwapError::Truncated);
    }
    let header = ChunkHeader {
        precision: b[12],
        kind: b[13],
        n_tokens: le_u16(b, 14),
        shape_hash: le_u64(b, 16),
        n_layers: le_u32(b, 24),
    };
    // u64 arithmetic: n_layers ≤ 2^32, so this cannot overflow.
    let table_end = FIXED_LEN as u64 + ENTRY_LEN as u64 * u64::from(header.n_layers);
    let data_start = table_end + CRC_LEN as u64;
    if data_start > file_len {
        return Err(SwapError::Truncated);
    }
    // Now data_start ≤ b.len(), so these fit in usize.
    let table_end = table_end as usize;
    let data_start = data_start as usize;
    if crc32fast::hash(&b[..table_end]) != le_u32(b, table_end) {
        return Err(SwapError::Corrupt("header checksum mismatch".into()));
    }
    let mut layers = Vec::with_capacity(header.n_layers as usize);
    let mut expect_offset = data_start as u64;
    for l in 0..header.n_layers as usize {
        let e = FIXED_LEN + ENTRY_LEN * l;
        let offset = le_u64(b, e);
        let comp_len = u64::from(le_u32(b, e + 8));
        let raw_len = u64::from(le_u32(b, e + 12));
        let crc = le_u32(b, e + 16);
        if offset != expect_offset {
            return Err(SwapError::Corrupt(format!(
                "layer {l} block at offset {offset}, expected {expect_offset}"
            )));
        }
        // offset ≤ file_len < 2^64 and comp_len < 2^32: no overflow in practice, but be exact.
        let end = offset
            .checked_add(comp_len)
            .ok_or_else(|| SwapError::Corrupt(format!("layer {l} block end overflows")))?;
        if end > file_len {
            return Err(SwapError::Truncated);
        }
        if raw_len > comp_len * MAX_LZ4_RATIO + LZ4_RATIO_SLACK {
            return Err(SwapError::Corrupt(format!(
                "layer {l}: raw length {raw_len} impossible for a {comp_len}-byte lz4 block"
            )));
        }
        let raw_len = usize::try_from(raw_len)
            .map_err(|_| SwapError::Corrupt(format!("layer {l} raw length too large")))?;
        // offset and end ≤ file_len = b.len(), so both fit in usize.
        layers.push(LayerEntry {
            offset: offset as usize,
            comp_len: comp_len as usize,
            raw_len,
            crc,
        });
        expect_offset = end;
    }
    if expect_offset != file_len {
        return Err(SwapError::Corrupt(format!(
            "{} trailing bytes after the last layer",
            file_len - expect_offset
        )));
    }
    Ok((header, layers))
}

impl ChunkFile {
    /// Opens and maps `path`, validating the header, the header/table crc and every layer's
    /// offset and length against the file size.
    pub fn open(path: &Path) -> Result<Self, SwapError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len < (FIXED_LEN + CRC_LEN) as u64 {
            // Too short to be a chunk file; read it to report magic/version/truncation
            // precisely, without mapping an empty or tiny file.
            let b = std::fs::read(path)?;
            parse(&b)?;
            return Err(SwapError::Truncated);
        }
        // SAFETY: the map is read-only and private to this process. Chunk files live in a
        // 0700 directory owned by the daemon, are created 0600 under a temporary name and
        // renamed into place once complete, and are never modified in place afterwards
        // (rewriting a chunk renames a new inode over the old name, which leaves this
        // mapping intact). So the mapped bytes do not change or shrink while we hold them;
        // and every read of them below is bounds-checked, so even unexpected content
        // cannot cause an out-of-bounds access. MAP_POPULATE: a restore reads every byte,
        // and faulting the pages in one go is several times faster than page by page.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file)? };
        let (header, layers) = parse(&map)?;
        Ok(ChunkFile {
            map,
            header,
            layers,
        })
    }

    /// Like [`ChunkFile::open`], and rejects a file written for another model/KV shape.
    pub fn open_for_shape(path: &Path, shape_hash: u64) -> Result<Self, SwapError> {
        let f = Self::open(path)?;
        if f.header.shape_hash != shape_hash {
            return Err(SwapError::ShapeMismatch {
                expected: shape_hash,
                found: f.header.shape_hash,
            });
        }
        Ok(f)
    }

    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// Size of the file on disk, in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// Number of layers (same as `header().n_layers`).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Uncompressed length of layer `l`, or None if out of range.
    pub fn layer_raw_len(&self, l: usize) -> Option<usize> {
        self.layers.get(l).map(|e| e.raw_len)
    }

    /// Sum of all layers' uncompressed lengths.
    pub fn total_raw_len(&self) -> usize {
        self.layers.iter().map(|e| e.raw_len).sum()
    }

    /// Decompresses layer `l` into a fresh buffer and checks its crc.
    pub fn read_layer(&self, l: usize) -> Result<Box<[u8]>, SwapError> {
        let raw_len = self.entry(l)?.raw_len;
        let mut out = vec![0u8; raw_len].into_boxed_slice();
        self.read_layer_into(l, &mut out)?;
        Ok(out)
    }

    /// Decompresses layer `l` into `out`, which must be exactly the layer's raw length, and
    /// checks its crc. On error the content of `out` is unspecified.
    pub fn read_layer_into(&self, l: usize, out: &mut [u8]) -> Result<(), SwapError> {
        let e = self.entry(l)?;
        if out.len() != e.raw_len {
            return Err(SwapError::BufferSize {
                layer: l,
                expected: e.raw_len,
                got: out.len(),
            });
        }
        let block = self
            .map
            .get(e.offset..e.offset + e.comp_len)
            .ok_or(SwapError::Truncated)?;
        let n = lz4_flex::block::decompress_into(block, out)
            .map_err(|err| SwapError::Corrupt(format!("layer {l}: lz4: {err}")))?;
        if n != e.raw_len {
            return Err(SwapError::Corrupt(format!(
                "layer {l}: decoded {n} bytes, expected {}",
                e.raw_len
            )));
        }
        if crc32fast::hash(out) != e.crc {
            return Err(SwapError::Checksum { layer: l });
        }
        Ok(())
    }

    fn entry(&self, l: usize) -> Result<LayerEntry, SwapError> {
        self.layers
            .get(l)
            .copied()
            .ok_or(SwapError::LayerOutOfRange {
                layer: l,
                n_layers: self.layers.len(),
            })
    }
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

    fn hdr(n_layers: u32) -> ChunkHeader {
        ChunkHeader {
            precision: 3,
            kind: ChunkHeader::KIND_SEALED,
            n_tokens: 16,
            n_layers,
            shape_hash: 0x0123_4567_89ab_cdef,
        }
    }

    /// Layers of mixed nature: compressible, incompressible, empty, tiny, repetitive.
    fn sample_layers(seed: u64) -> Vec<Vec<u8>> {
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

    fn as_slices(v: &[Vec<u8>]) -> Vec<&[u8]> {
        v.iter().map(|l| l.as_slice()).collect()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c0.kv");
        let layers = sample_layers(1);
        let h = hdr(layers.len() as u32);
        let size = write_chunk(&path, &h, &as_slices(&layers)).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert!(!tmp_path(&path).exists(), "tmp file left behind");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let f = ChunkFile::open(&path).unwrap();
        assert_eq!(*f.header(), h);
        assert_eq!(f.file_bytes(), size);
        assert_eq!(f.n_layers(), layers.len());
        for (l, want) in layers.iter().enumerate() {
            assert_eq!(f.layer_raw_len(l), Some(want.len()));
            assert_eq!(&*f.read_layer(l).unwrap(), want.as_slice());
            let mut buf = vec![0xAAu8; want.len()];
            f.read_layer_into(l, &mut buf).unwrap();
            assert_eq!(&buf, want);
        }
        // Layers can be read in any order, repeatedly.
        assert_eq!(&*f.read_layer(2).unwrap(), layers[2].as_slice());
        assert_eq!(
            f.total_raw_len(),
            layers.iter().map(Vec::len).sum::<usize>()
        );
    }

    #[test]
    fn zero_layers_and_staged_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.kv");
        let h = ChunkHeader {
            precision: 0,
            kind: ChunkHeader::KIND_STAGED_F32,
            n_tokens: 3,
            n_layers: 0,
            shape_hash: u64::MAX,
        };
        let size = write_chunk(&path, &h, &[]).unwrap();
        assert_eq!(size, (FIXED_LEN + CRC_LEN) as u64);
        let f = ChunkFile::open(&path).unwrap();
        assert_eq!(*f.header(), h);
        assert!(matches!(
            f.read_layer(0),
            Err(SwapError::LayerOutOfRange {
                layer: 0,
                n_layers: 0
            })
        ));
    }

    #[test]
    fn overwrite_replaces_and_keeps_old_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let a = vec![1u8; 4000];
        let b = vec![2u8; 300];
        write_chunk(&path, &hdr(1), &[&a]).unwrap();
        let old = ChunkFile::open(&path).unwrap();
        // A stale tmp from a crash, with a loose mode, must not leak its mode into the file.
        std::fs::write(tmp_path(&path), b"junk").unwrap();
        std::fs::set_permissions(tmp_path(&path), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_chunk(&path, &hdr(1), &[&b]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp_path(&path).exists());
        assert_eq!(
            &*ChunkFile::open(&path).unwrap().read_layer(0).unwrap(),
            &b[..]
        );
        assert_eq!(&*old.read_layer(0).unwrap(), &a[..]);
    }

    #[test]
    fn errors_on_bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let a = [1u8, 2, 3];
        assert!(matches!(
            write_chunk(&path, &hdr(2), &[&a]),
            Err(SwapError::InvalidInput(_))
        ));
        assert!(!path.exists() && !tmp_path(&path).exists());
        write_chunk(&path, &hdr(1), &[&a]).unwrap();
        let f = ChunkFile::open(&path).unwrap();
        assert!(matches!(
            f.read_layer(1),
            Err(SwapError::LayerOutOfRange {
                layer: 1,
                n_layers: 1
            })
        ));
        assert!(f.layer_raw_len(1).is_none());
        let mut small = [0u8; 2];
        assert!(matches!(
            f.read_layer_into(0, &mut small),
            Err(SwapError::BufferSize {
                layer: 0,
                expected: 3,
                got: 2
            })
        ));
        assert!(matches!(
            ChunkFile::open(&dir.path().join("missing.kv")),
            Err(SwapError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound
        ));
        assert!(ChunkFile::open_for_shape(&path, hdr(1).shape_hash).is_ok());
        assert!(matches!(
            ChunkFile::open_for_shape(&path, 42),
            Err(SwapError::ShapeMismatch { expected: 42, .. })
        ));
    }

    #[test]
    fn bad_magic_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        write_chunk(&path, &hdr(1), &[b"hello hello hello"]).unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut b = good.clone();
        b[0..8].copy_from_slice(b"GGUF\0\0\0\0");
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(ChunkFile::open(&path), Err(SwapError::BadMagic)));

        let mut b = good.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(
            ChunkFile::open(&path),
            Err(SwapError::UnsupportedVersion(2))
        ));

        // A consistent header (crc recomputed) with another version is still refused.
        let mut b = good.clone();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let t = FIXED_LEN + ENTRY_LEN;
        let crc = crc32fast::hash(&b[..t]);
        b[t..t + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(
            ChunkFile::open(&path),
            Err(SwapError::UnsupportedVersion(7))
        ));

        std::fs::write(&path, b"").unwrap();
        assert!(matches!(ChunkFile::open(&path), Err(SwapError::Truncated)));
        std::fs::write(&path, b"LLM").unwrap();
        assert!(matches!(ChunkFile::open(&path), Err(SwapError::Truncated)));
        std::fs::write(&path, b"xyz").unwrap();
        assert!(matches!(ChunkFile::open(&path), Err(SwapError::BadMagic)));
    }

    /// Opens `bytes` as a chunk file and reads every layer; Ok only if everything succeeds.
    fn open_and_read_all(path: &Path, bytes: &[u8]) -> Result<Vec<Box<[u8]>>, SwapError> {
        std::fs::write(path, bytes)?;
        let f = ChunkFile::open(path)?;
        (0..f.n_layers()).map(|l| f.read_layer(l)).collect()
    }

    fn small_file() -> (tempfile::TempDir, Vec<u8>, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.kv");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let layers = vec![
            (0..40).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>(),
            Vec::new(),
            b"abcabcabcabcabcabcabcabcabcabcabcabcabcabcXYZ".to_vec(),
            (0..60).map(|_| rng.gen_range(0u8..4)).collect(),
        ];
        write_chunk(&path, &hdr(4), &as_slices(&layers)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (dir, bytes, layers)
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (dir, good, layers) = small_file();
        let path = dir.path().join("flip.kv");
        let all = open_and_read_all(&path, &good).unwrap();
        assert_eq!(all.len(), layers.len());
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
                        assert!(i >= FIXED_LEN + ENTRY_LEN * 4 + CRC_LEN, "header byte {i}");
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
        let (dir, good, _) = small_file();
        let path = dir.path().join("crafted.kv");
        let table_end = FIXED_LEN + ENTRY_LEN * 4;
        let patch = |b: &mut Vec<u8>| {
            let crc = crc32fast::hash(&b[..table_end]);
            b[table_end..table_end + 4].copy_from_slice(&crc.to_le_bytes());
        };
        // Huge raw length on layer 0.
        let mut b = good.clone();
        b[FIXED_LEN + 12..FIXED_LEN + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        patch(&mut b);
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Corrupt(_))
        ));
        // Offset near u64::MAX.
        let mut b = good.clone();
        b[FIXED_LEN..FIXED_LEN + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        patch(&mut b);
        assert!(open_and_read_all(&path, &b).is_err());
        // n_layers = u32::MAX.
        let mut b = good.clone();
        b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open_and_read_all(&path, &b),
            Err(SwapError::Truncated)
        ));
        // Wrong raw length (crc-consistent table) → decode length mismatch.
        let mut b = good.clone();
        let e = FIXED_LEN + 2 * ENTRY_LEN + 12;
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
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fuzz.kv");
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_le_bytes());
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
            let (dir, good, layers) = small_file();
            let path = dir.path().join("fuzz.kv");
            let mut b = good.clone();
            for (i, v) in &edits {
                let i = i.index(b.len());
                b[i] = *v;
            }
            let table_end = FIXED_LEN + ENTRY_LEN * 4;
            if fix_crc {
                let crc = crc32fast::hash(&b[..table_end]);
                b[table_end..table_end + 4].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(got) = open_and_read_all(&path, &b) {
                // Accepted only if the table is unchanged (so each layer's crc was checked
                // against the original) and the decoded data is the original data.
                prop_assert_eq!(got.len(), layers.len());
                for (g, w) in got.iter().zip(&layers) {
                    prop_assert_eq!(&**g, w.as_slice());
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

    #[test]
    fn throughput() {
        const FILES: usize = 64;
        const LAYERS: usize = 32;
        const LAYER_BYTES: usize = 6400; // 32 × 6400 = 200 KiB per chunk
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        let chunks: Vec<Vec<Vec<u8>>> = (0..FILES)
            .map(|_| {
                (0..LAYERS)
                    .map(|_| int4_like_layer(&mut rng, LAYER_BYTES))
                    .collect()
            })
            .collect();
        let raw_total = (FILES * LAYERS * LAYER_BYTES) as f64;
        let mb = |bytes: f64, secs: f64| bytes / secs / 1e6;

        let paths: Vec<PathBuf> = (0..FILES)
            .map(|i| dir.path().join(format!("{i}.kv")))
            .collect();
        let t = Instant::now();
        let mut disk = 0u64;
        for (p, c) in paths.iter().zip(&chunks) {
            disk += write_chunk(p, &hdr(LAYERS as u32), &as_slices(c)).unwrap();
        }
        super::super::durable::sync_dir(dir.path()).unwrap();
        let write_s = t.elapsed().as_secs_f64();

        // Compression alone, for reference (no I/O, no fsync).
        let t = Instant::now();
        let mut comp = 0usize;
        for c in &chunks {
            for l in c {
                comp += lz4_flex::block::compress(l).len();
            }
        }
        let compress_s = t.elapsed().as_secs_f64();

        // Each variant opens the files afresh, so each pays the same mmap page faults.
        let open_all =
            || -> Vec<ChunkFile> { paths.iter().map(|p| ChunkFile::open(p).unwrap()).collect() };
        let mut best_read = f64::MAX;
        let mut best_into = f64::MAX;
        let mut best_open = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let files = open_all();
            best_open = best_open.min(t.elapsed().as_secs_f64());
            drop(files);

            let files = open_all();
            let t = Instant::now();
            for (f, c) in files.iter().zip(&chunks) {
                for (l, want) in c.iter().enumerate() {
                    let got = f.read_layer(l).unwrap();
                    assert_eq!(got.len(), want.len());
                }
            }
            best_read = best_read.min(t.elapsed().as_secs_f64());
            drop(files);

            let files = open_all();
            let mut buf = vec![0u8; LAYER_BYTES];
            let t = Instant::now();
            for f in &files {
                for l in 0..LAYERS {
                    f.read_layer_into(l, &mut buf).unwrap();
                }
            }
            best_into = best_into.min(t.elapsed().as_secs_f64());
        }
        // Breakdown: lz4 decode alone and crc alone, from memory.
        let compressed: Vec<Vec<u8>> = chunks
            .iter()
            .flatten()
            .map(|l| lz4_flex::block::compress(l))
            .collect();
        let mut buf = vec![0u8; LAYER_BYTES];
        let t = Instant::now();
        for c in &compressed {
            lz4_flex::block::decompress_into(c, &mut buf).unwrap();
        }
        let decode_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut x = 0u32;
        for l in chunks.iter().flatten() {
            x ^= crc32fast::hash(l);
        }
        let crc_s = t.elapsed().as_secs_f64();
        std::hint::black_box(x);
        // Correctness of what was timed.
        let f = ChunkFile::open(&paths[5]).unwrap();
        assert_eq!(&*f.read_layer(9).unwrap(), chunks[5][9].as_slice());

        println!(
            "kvstore swapfile throughput: {FILES} chunks × {LAYERS} layers × {LAYER_BYTES} B \
             = {:.1} MB raw, {:.1} MB on disk (ratio {:.3})",
            raw_total / 1e6,
            disk as f64 / 1e6,
            disk as f64 / raw_total
        );
        println!(
            "  write_chunk (lz4 + crc + write + fsync + rename): {:.0} MB/s ({:.2} ms/chunk)",
            mb(raw_total, write_s),
            write_s * 1e3 / FILES as f64
        );
        println!(
            "  lz4 compress alone: {:.0} MB/s (compressed {:.1} MB)",
            mb(raw_total, compress_s),
            comp as f64 / 1e6
        );
        println!(
            "  open (mmap + validate): {:.1} µs/file",
            best_open * 1e6 / FILES as f64
        );
        println!(
            "  read_layer (mmap + lz4 decode + crc, page cache warm): {:.0} MB/s",
            mb(raw_total, best_read)
        );
        println!(
            "  read_layer_into (reused buffer): {:.0} MB/s",
            mb(raw_total, best_into)
        );
        println!(
            "  breakdown from memory: lz4 decode {:.0} MB/s, crc32 {:.0} MB/s",
            mb(raw_total, decode_s),
            mb(raw_total, crc_s)
        );
    }
}
