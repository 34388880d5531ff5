//! Reference outputs that tests compare against: the `expected.safetensors` files that
//! `scripts/make_fixtures.py` writes from Hugging Face (input ids, logits, greedy tokens), and
//! the same file written by Rust for Python to check (`--verify-method`).

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{PeftError, Result};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Input ids `[batch, seq]`, the logits computed on them, and (for causal models) the greedy
/// continuation of the first row.
#[derive(Debug, Clone)]
pub struct Expected {
    pub input_ids: Vec<i64>,
    pub ids_shape: [usize; 2],
    pub logits: Vec<f32>,
    pub logits_shape: Vec<usize>,
    pub greedy: Option<Vec<i64>>,
}

fn ints(view: &TensorView<'_>) -> Vec<i64> {
    view.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

impl Expected {
    /// Read `path` (`input_ids` i64, `logits` f32, optional `greedy` i64).
    pub fn read(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
        let st =
            SafeTensors::deserialize(&raw).map_err(|e| PeftError::format(path, e.to_string()))?;
        let get = |name: &str, dtype: Dtype| -> Result<TensorView<'_>> {
            let t = st
                .tensor(name)
                .map_err(|_| PeftError::format(path, format!("no tensor `{name}`")))?;
            if t.dtype() != dtype {
                return Err(PeftError::format(
                    path,
                    format!("`{name}` is {:?}, expected {dtype:?}", t.dtype()),
                ));
            }
            Ok(t)
        };
        let ids = get("input_ids", Dtype::I64)?;
        let [b, s] = ids
            .shape()
            .try_into()
            .map_err(|_| PeftError::format(path, "input_ids is not 2-D"))?;
        let logits = get("logits", Dtype::F32)?;
        let values = logits
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let greedy = match st.tensor("greedy") {
            Ok(_) => Some(ints(&get("greedy", Dtype::I64)?)),
            Err(_) => None,
        };
        Ok(Self {
            input_ids: ints(&ids),
            ids_shape: [b, s],
            logits: values,
            logits_shape: logits.shape().to_vec(),
            greedy,
        })
    }

    /// Write the file (what `scripts/make_fixtures.sh --verify-method` reads).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let ids = bytes(&self.input_ids);
        let logits: Vec<u8> = self.logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let greedy = self.greedy.as_deref().map(bytes);
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> TensorView<'_> {
            TensorView::new(dtype, shape, data).expect("consistent view")
        }
        let mut views = vec![
            (
                "input_ids".to_string(),
                view(Dtype::I64, self.ids_shape.to_vec(), &ids),
            ),
            (
                "logits".to_string(),
                view(Dtype::F32, self.logits_shape.clone(), &logits),
            ),
        ];
        if let Some(g) = &greedy {
            views.push(("greedy".to_string(), view(Dtype::I64, vec![g.len() / 8], g)));
        }
        let out = safetensors::serialize(views, None)
            .map_err(|e| PeftError::format(path, e.to_string()))?;
        peft_core::tensors::write_atomic(path, &out)
    }

    /// The input ids as a tensor.
    pub fn ids(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(
            TensorData::new(self.input_ids.clone(), self.ids_shape),
            device,
        )
    }

    /// The logits as a tensor.
    pub fn logits<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::from_data(
            TensorData::new(self.logits.clone(), self.logits_shape.clone()),
            device,
        )
    }

    /// The rows of input ids without their trailing padding (id 0) and the attention mask, as
    /// [`crate::bert::encode_batch`] builds them.
    pub fn padded_batch(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
        let rows: Vec<Vec<u32>> = self
            .input_ids
            .chunks(self.ids_shape[1])
            .map(|r| {
                let len = r.iter().rposition(|&t| t != 0).map_or(0, |i| i + 1);
                r[..len].iter().map(|&t| t as u32).collect()
            })
            .collect();
        crate::bert::encode_batch(&rows, device)
    }

    /// The first row of input ids (the greedy prompt).
    pub fn prompt(&self) -> Vec<u32> {
        self.input_ids[..self.ids_shape[1]]
            .iter()
            .map(|&t| t as u32)
            .collect()
    }
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar()
}
