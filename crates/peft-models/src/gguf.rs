//! A small GGUF reader: metadata, and tensors dequantized to f32 (F32, F16, BF16, Q8_0,
//! Q4_0, Q4_1). No maintained crate reads GGUF without pulling a whole inference engine, and
//! the format is simple: a header, key/values, tensor infos, then aligned data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use peft_core::tensors::HostTensor;
use peft_core::{PeftError, Result};
use rayon::prelude::*;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U(u64),
    I(i64),
    F(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(v) => Some(*v),
            Value::I(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F(v) => Some(*v),
            Value::U(v) => Some(*v as f64),
            Value::I(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major shape (GGUF lists dimensions fastest first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    offset: usize,
}

/// The bytes of a GGUF file: memory-mapped from disk, or held in memory.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An opened GGUF file (memory-mapped).
pub struct GgufFile {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    map: Bytes,
    data_start: usize,
}

/// Arrays nested deeper than this are refused (a few bytes per level would otherwise let a
/// small file exhaust the stack).
const MAX_NESTING: usize = 8;
/// More dimensions than this is not a tensor any model has.
const MAX_DIMS: usize = 8;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() - self.pos {
            return Err(PeftError::format(
                self.path,
                format!("truncated GGUF header at byte {}", self.pos),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U(self.take(1)?[0] as u64),
            1 => Value::I(self.take(1)?[0] as i8 as i64),
            2 => Value::U(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::I(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::U(self.u32()? as u64),
            5 => Value::I(self.u32()? as i32 as i64),
            6 => Value::F(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(PeftError::format(
                        self.path,
                        format!(
                            "GGUF arrays nested deeper than {MAX_NESTING} at byte {}",
                            self.pos
                        ),
                    ));
                }
                let item = self.u32()?;
                let n = self.u64()? as usize;
                // Every item takes at least one byte: a count past the end is a lie, not a reason
                // to reserve memory.
                let mut v = Vec::with_capacity(n.min(self.bytes.len() - self.pos));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U(self.u64()?),
            11 => Value::I(self.u64()? as i64),
            12 => Value::F(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            t => {
                return Err(PeftError::format(
                    self.path,
                    format!("unknown GGUF value type {t}"),
                ));
            }
        })
    }
}

fn type_name(t: u32) -> String {
    match t {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        8 => "Q8_0".into(),
        10 => "Q2_K".into(),
        11 => "Q3_K".into(),
        12 => "Q4_K".into(),
        13 => "Q5_K".into(),
        14 => "Q6_K".into(),
        30 => "BF16".into(),
        t => format!("type {t}"),
    }
}

/// Bytes of one block and elements per block of a supported type.
fn block_layout(t: u32) -> Option<(usize, usize)> {
    match t {
        0 => Some((4, 1)),
        1 | 30 => Some((2, 1)),
        2 => Some((18, 32)),
        3 => Some((20, 32)),
        8 => Some((34, 32)),
        _ => None,
    }
}

impl GgufFile {
    /// Open and parse the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| PeftError::io(path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped by this process.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| PeftError::io(path, e))?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parse GGUF bytes held in memory; `path` only names them in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Bytes::Owned(bytes))
    }

    fn parse(path: &Path, map: Bytes) -> Result<Self> {
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(PeftError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(PeftError::format(
                path,
                format!("unsupported GGUF version {version}"),
            ));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            metadata.insert(key, c.value(ty, 0)?);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > MAX_DIMS {
                return Err(PeftError::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64()? as usize);
            }
            dims.reverse();
            let ggml_type = c.u32()?;
            let offset = c.u64()? as usize;
            tensors.insert(
                name,
                TensorInfo {
                    shape: dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(PeftError::format(
                        path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ));
                }
            },
        };
        let data_start = c.pos.div_ceil(align) * align;
        drop(c);
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            map,
            data_start,
        })
    }

    /// Where the tensor data starts: everything before is the header (metadata, tensor infos).
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required metadata value, or an error naming the key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.meta(key)
            .ok_or_else(|| PeftError::format(&self.path, format!("missing metadata `{key}`")))
    }

    /// Read tensor `name` dequantized to f32.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| PeftError::MissingTensor {
                path: self.path.clone(),
                key: name.to_string(),
            })?;
        let too_big = || {
            PeftError::format(
                &self.path,
                format!(
                    "tensor `{name}`: shape {:?} is larger than the file",
                    info.shape
                ),
            )
        };
        let n = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(too_big)?;
        let (block_bytes, block_elems) =
            block_layout(info.ggml_type).ok_or_else(|| PeftError::Dtype {
                path: self.path.clone(),
                key: name.to_string(),
                dtype: format!(
                    "{} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                    type_name(info.ggml_type)
                ),
            })?;
        if n % block_elems != 0 {
            return Err(PeftError::format(
                &self.path,
                format!("tensor `{name}`: {n} values are not whole blocks"),
            ));
        }
        let past_end = || {
            PeftError::format(
                &self.path,
                format!("tensor `{name}` extends past the end of the file"),
            )
        };
        let start = self
            .data_start
            .checked_add(info.offset)
            .ok_or_else(past_end)?;
        let len = (n / block_elems)
            .checked_mul(block_bytes)
            .ok_or_else(too_big)?;
        let end = start.checked_add(len).ok_or_else(past_end)?;
        let bytes = self.map.get(start..end).ok_or_else(past_end)?;
        Ok(HostTensor::new(
            info.shape.clone(),
            dequantize(info.ggml_type, bytes, n),
        ))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `n` values of ggml type `t` (the caller checked the type is supported).
fn dequantize(t: u32, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    match t {
        0 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        1 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(o, b)| *o = f16_at(b, 0)),
        30 => out
            .par_iter_mut()
            .zip(bytes.par_chunks_exact(2))
            .for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        // Q4_0 / Q4_1: 32 values per block; low nibbles are the first 16, high nibbles the rest.
        2 | 3 => {
            let block = if t == 2 { 18 } else { 20 };
            out.par_chunks_mut(32)
                .zip(bytes.par_chunks_exact(block))
                .for_each(|(o, b)| {
                    let d = f16_at(b, 0);
                    let (m, qs, offset) = if t == 2 {
                        (0.0, &b[2..18], 8.0)
                    } else {
                        (f16_at(b, 2), &b[4..20], 0.0)
                    };
                    for j in 0..16 {
                        o[j] = ((qs[j] & 0x0F) as f32 - offset) * d + m;
                        o[j + 16] = ((qs[j] >> 4) as f32 - offset) * d + m;
                    }
                })
        }
        8 => out
            .par_chunks_mut(32)
            .zip(bytes.par_chunks_exact(34))
            .for_each(|(o, b)| {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }),
        _ => unreachable!("checked by block_layout"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_and_q8_0_blocks() {
        // d = 0.5, m = -1, nibbles 0..15 low / 15..0 high.
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let v = dequantize(3, &b, 32);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 6.5);
        assert_eq!(v[16], 6.5);
        let mut q = Vec::new();
        q.extend(f16::from_f32(0.25).to_le_bytes());
        q.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(8, &q, 32);
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 3.75);
    }

    #[test]
    fn not_a_gguf_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GGML....").unwrap();
        let err = GgufFile::open(&p).err().unwrap().to_string();
        assert!(err.contains("x.gguf") && err.contains("magic"), "{err}");
    }
}
