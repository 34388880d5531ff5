//! Host-side named tensors and their safetensors files.
//!
//! Checkpoints and adapters move through [`TensorMap`]: an ordered map from a Hugging Face key
//! to a [`HostTensor`] (f32 values, or bytes for `U8`) that remembers the dtype it was stored
//! in, so that a file we re-save keeps its dtype. Writes go to a temporary file that is renamed into place, so a
//! failure never leaves half a file behind.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::{PeftError, Result};

/// Storage dtypes we read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    /// Raw bytes (packed 4-bit weights and serialized quantization state), held as bytes in
    /// [`HostTensor::bytes`] so a 4-bit checkpoint costs its size in memory, not four times it.
    U8,
    /// 32-bit integers (sparse adapters' indices), held little-endian in [`HostTensor::bytes`].
    I32,
}

impl StoredDtype {
    /// Whether values live in [`HostTensor::data`] (f32 of any float dtype) rather than bytes.
    pub fn is_float(self) -> bool {
        !matches!(self, StoredDtype::U8 | StoredDtype::I32)
    }

    fn to_safetensors(self) -> Dtype {
        match self {
            StoredDtype::F32 => Dtype::F32,
            StoredDtype::F16 => Dtype::F16,
            StoredDtype::BF16 => Dtype::BF16,
            StoredDtype::U8 => Dtype::U8,
            StoredDtype::I32 => Dtype::I32,
        }
    }

    /// Name as written in safetensors headers (`F32`, `F16`, `BF16`).
    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "F32",
            StoredDtype::F16 => "F16",
            StoredDtype::BF16 => "BF16",
            StoredDtype::U8 => "U8",
            StoredDtype::I32 => "I32",
        }
    }
}

/// A tensor on the host: row-major values, its shape and the dtype it is stored in. Float
/// dtypes hold f32 values in `data`; `U8` and `I32` hold their bytes in `bytes`. The other
/// field is empty.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub bytes: Vec<u8>,
    pub dtype: StoredDtype,
}

impl HostTensor {
    /// An f32 tensor.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not fit {} values",
            data.len()
        );
        Self {
            shape,
            data,
            bytes: Vec::new(),
            dtype: StoredDtype::F32,
        }
    }

    /// Number of elements (the product of the shape), whatever the dtype.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Read a device tensor back to the host.
    pub fn from_tensor<const D: usize>(tensor: Tensor<D>) -> Self {
        let shape = tensor.dims().to_vec();
        let data = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 tensor data");
        Self::new(shape, data)
    }

    /// Upload to `device` as a rank-`D` tensor; panics if the rank differs (checked by callers).
    pub fn to_tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        assert_eq!(self.shape.len(), D, "rank mismatch");
        let values = match self.dtype {
            StoredDtype::U8 => self.bytes.iter().map(|&b| b as f32).collect(),
            StoredDtype::I32 => self.i32_values().map(|v| v as f32).collect(),
            _ => self.data.clone(),
        };
        Tensor::from_data(TensorData::new(values, self.shape.clone()), device)
    }

    /// The transpose of a rank-2 tensor (Hugging Face `[out, in]` <-> burn `[in, out]`).
    pub fn transposed(&self) -> Self {
        assert_eq!(self.shape.len(), 2, "transpose needs a matrix");
        assert!(self.dtype.is_float(), "transpose of a byte tensor");
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; self.data.len()];
        // In square tiles, so reads and writes both stay within a few cache lines (a plain
        // double loop writes one value per line of a large output).
        const TILE: usize = 32;
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let row = &self.data[r * cols..(r + 1) * cols];
                    for c in c0..(c0 + TILE).min(cols) {
                        out[c * rows + r] = row[c];
                    }
                }
            }
        }
        Self {
            shape: vec![cols, rows],
            data: out,
            bytes: Vec::new(),
            dtype: self.dtype,
        }
    }

    /// A byte tensor (stored as `U8`).
    pub fn from_bytes(shape: Vec<usize>, bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        assert_eq!(
            shape.iter().product::<usize>(),
            bytes.len(),
            "shape {shape:?} does not fit {} bytes",
            bytes.len()
        );
        Self {
            shape,
            data: Vec::new(),
            bytes,
            dtype: StoredDtype::U8,
        }
    }

    /// An `I32` tensor.
    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape {shape:?} does not fit {} values",
            values.len()
        );
        Self {
            shape,
            data: Vec::new(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            dtype: StoredDtype::I32,
        }
    }

    /// The values of an `I32` tensor (empty for other dtypes).
    pub fn i32_values(&self) -> impl Iterator<Item = i32> + '_ {
        let bytes = if self.dtype == StoredDtype::I32 {
            &self.bytes[..]
        } else {
            &[]
        };
        bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Same float values, stored as `dtype` when written (float dtypes only).
    pub fn with_dtype(mut self, dtype: StoredDtype) -> Self {
        assert!(
            self.dtype.is_float() && dtype.is_float(),
            "byte and integer tensors are built with from_bytes / from_i32"
        );
        self.dtype = dtype;
        self
    }

    /// The bytes of the stored form (borrowed for `U8`, which is already bytes).
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(match self.dtype {
            StoredDtype::F32 => self.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            StoredDtype::F16 => self
                .data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            StoredDtype::BF16 => self
                .data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            StoredDtype::U8 | StoredDtype::I32 => return Cow::Borrowed(&self.bytes),
        })
    }
}

/// Named tensors in key order, as a safetensors file holds them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorMap {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl TensorMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(key.into(), tensor);
    }

    pub fn get(&self, key: &str) -> Option<&HostTensor> {
        self.tensors.get(key)
    }

    pub fn remove(&mut self, key: &str) -> Option<HostTensor> {
        self.tensors.remove(key)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Take the float tensor `key`, checking its shape; `path` names the file in errors.
    pub fn take_shaped(
        &mut self,
        path: &Path,
        key: &str,
        expected: &[usize],
    ) -> Result<HostTensor> {
        let tensor = self.remove(key).ok_or_else(|| PeftError::MissingTensor {
            path: path.to_path_buf(),
            key: key.to_string(),
        })?;
        if !tensor.dtype.is_float() {
            return Err(PeftError::Dtype {
                path: path.to_path_buf(),
                key: key.to_string(),
                dtype: format!("{} (a float dtype is needed here)", tensor.dtype.name()),
            });
        }
        if tensor.shape != expected {
            return Err(PeftError::Shape {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected: expected.to_vec(),
                actual: tensor.shape,
            });
        }
        Ok(tensor)
    }

    /// Read a safetensors file, converting f16/bf16 to f32 (other dtypes are an error naming
    /// the tensor).
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
        Self::from_safetensors_bytes(path, &bytes)
    }

    /// Read the float and byte tensors of a model checkpoint, skipping integer buffers such as
    /// BERT's `position_ids` (they are not weights).
    pub fn read_safetensors_weights(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
        Self::parse(path, &bytes, true)
    }

    /// Parse safetensors bytes; `path` is only used in error messages.
    pub fn from_safetensors_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        Self::parse(path, bytes, false)
    }

    fn parse(path: &Path, bytes: &[u8], skip_integers: bool) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| PeftError::format(path, format!("not a valid safetensors file: {e}")))?;
        let mut map = TensorMap::new();
        for (key, view) in st.tensors() {
            let raw = view.data();
            let (data, dtype) = match view.dtype() {
                // Bytes stay bytes: 4-bit checkpoints store packed weights and state as U8.
                Dtype::U8 => {
                    map.insert(key, HostTensor::from_bytes(view.shape().to_vec(), raw));
                    continue;
                }
                // Sparse adapters' indices; models' integer buffers are skipped below.
                Dtype::I32 if !skip_integers => {
                    let t = HostTensor {
                        shape: view.shape().to_vec(),
                        data: Vec::new(),
                        bytes: raw.to_vec(),
                        dtype: StoredDtype::I32,
                    };
                    map.insert(key, t);
                    continue;
                }
                Dtype::F32 => (
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    StoredDtype::F32,
                ),
                Dtype::F16 => (
                    raw.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    StoredDtype::F16,
                ),
                Dtype::BF16 => (
                    raw.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    StoredDtype::BF16,
                ),
                Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::BOOL if skip_integers => {
                    continue;
                }
                other => {
                    return Err(PeftError::Dtype {
                        path: path.to_path_buf(),
                        key,
                        dtype: format!("{other:?}"),
                    });
                }
            };
            map.insert(
                key,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                    bytes: Vec::new(),
                    dtype,
                },
            );
        }
        Ok(map)
    }

    /// Serialise to safetensors bytes with `metadata` (Hugging Face writes `{"format":"pt"}`).
    pub fn to_safetensors_bytes(&self, metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
        let buffers: Vec<(String, Cow<'_, [u8]>, &HostTensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_bytes(), t))
            .collect();
        let views = buffers
            .iter()
            .map(|(k, bytes, t)| {
                safetensors::tensor::TensorView::new(
                    t.dtype.to_safetensors(),
                    t.shape.clone(),
                    bytes.as_ref(),
                )
                .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| PeftError::Other(format!("cannot build safetensors view: {e}")))?;
        let metadata = Some(
            metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        safetensors::serialize(views, metadata)
            .map_err(|e| PeftError::Other(format!("cannot serialise safetensors: {e}")))
    }

    /// Write a safetensors file atomically with `{"format":"pt"}` metadata.
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        let bytes = self.to_safetensors_bytes(&[("format", "pt")])?;
        write_atomic(path, &bytes)
    }
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so
/// readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(PeftError::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_values_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut map = TensorMap::new();
        map.insert(
            "a",
            HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
        );
        map.insert(
            "b",
            HostTensor::new(vec![2], vec![0.5, -2.0]).with_dtype(StoredDtype::BF16),
        );
        map.insert("c", HostTensor::from_bytes(vec![3, 1], [0u8, 7, 255]));
        map.insert("d", HostTensor::from_i32(vec![3], &[0, -5, i32::MAX]));
        map.write_safetensors(&path).unwrap();
        let back = TensorMap::read_safetensors(&path).unwrap();
        assert_eq!(back, map);
        let d: Vec<i32> = back.get("d").unwrap().i32_values().collect();
        assert_eq!(d, [0, -5, i32::MAX]);
        // A model's integer buffers are not weights.
        assert!(
            TensorMap::read_safetensors_weights(&path)
                .unwrap()
                .get("d")
                .is_none()
        );
    }

    #[test]
    fn corrupt_file_is_a_format_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not safetensors").unwrap();
        let err = TensorMap::read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
    }

    #[test]
    fn wrong_shape_names_the_key() {
        let mut map = TensorMap::new();
        map.insert("w", HostTensor::new(vec![2, 2], vec![0.; 4]));
        let err = map
            .take_shaped(Path::new("f.safetensors"), "w", &[4, 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`w`") && err.contains("[2, 2]") && err.contains("[4, 2]"),
            "{err}"
        );
    }

    #[test]
    fn transpose_is_an_involution() {
        let t = HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(t.transposed().data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(t.transposed().transposed(), t);
        // Sizes around the tile edge: every entry lands where the definition puts it.
        for (rows, cols) in [(31, 33), (64, 32), (70, 5), (1, 100)] {
            let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let t = HostTensor::new(vec![rows, cols], data).transposed();
            assert_eq!(t.shape, [cols, rows]);
            for c in 0..cols {
                for r in 0..rows {
                    assert_eq!(t.data[c * rows + r], (r * cols + c) as f32);
                }
            }
        }
    }
}
