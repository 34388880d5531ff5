//! 4-bit weights in bitsandbytes' checkpoint layout (what transformers writes for a model
//! loaded with `BitsAndBytesConfig(load_in_4bit=True)` and reads back pre-quantized):
//!
//! - `<p>.weight`: the packed codes, `U8 [numel / 2, 1]`;
//! - `<p>.weight.absmax`: the scales, `F32 [blocks]`, or `U8 [blocks]` with double quantization;
//! - `<p>.weight.quant_map`: the 16-value codebook, `F32`;
//! - `<p>.weight.nested_absmax`, `<p>.weight.nested_quant_map`: the scales' own scales and
//!   their 256-value map (double quantization only);
//! - `<p>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): `U8` bytes of a JSON object with
//!   `quant_type`, `blocksize`, `dtype`, `shape` and, with double quantization,
//!   `nested_blocksize`, `nested_dtype`, `nested_offset`.

use std::path::Path;

use peft_core::tensors::{HostTensor, StoredDtype, TensorMap};
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

use crate::blockwise::{Absmax, BLOCK_SIZES, NESTED_BLOCKSIZE, Quantized4bit};
use crate::codebook::{QuantType, dynamic_map};

/// The non-tensor part of a bitsandbytes `QuantState`.
#[derive(Debug, Serialize, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f32>,
}

/// The key of the serialized quant state of weight `weight_key`, if the map has one.
pub fn quant_state_key(t: &TensorMap, weight_key: &str) -> Option<String> {
    let prefix = format!("{weight_key}.quant_state.bitsandbytes__");
    t.keys().find(|k| k.starts_with(&prefix)).cloned()
}

/// The `[out, in]` shape of the weight under `weight_key`: the tensor's own shape when dense,
/// the shape its quant state records when 4-bit; `None` when the map has no such weight.
pub fn weight_shape(t: &TensorMap, source: &Path, weight_key: &str) -> Result<Option<Vec<usize>>> {
    let Some(state_key) = quant_state_key(t, weight_key) else {
        return Ok(t.get(weight_key).map(|w| w.shape.clone()));
    };
    Ok(Some(
        parse_state(&t.get(&state_key).expect("found").bytes, source, &state_key)?.shape,
    ))
}

/// The quant state stored under `state_key`, or an error naming it.
fn parse_state(bytes: &[u8], source: &Path, state_key: &str) -> Result<QuantStateJson> {
    peft_core::error::from_json_slice(bytes).map_err(|e| {
        PeftError::format(
            source,
            format!("tensor `{state_key}`: not a bitsandbytes quant-state JSON: {e}"),
        )
    })
}

/// Whether the map holds any bitsandbytes 4-bit weight.
pub fn has_4bit(t: &TensorMap) -> bool {
    t.keys().any(|k| k.contains(".quant_state.bitsandbytes__"))
}

/// Take the 4-bit weight stored under `weight_key` (e.g. `model.layers.0.mlp.up_proj.weight`)
/// out of `t`, checking it is `[out, inp]`. `None` when that weight is not 4-bit. Every
/// inconsistency is an error naming the tensor and `source`.
pub fn take_4bit(
    t: &mut TensorMap,
    source: &Path,
    weight_key: &str,
    out: usize,
    inp: usize,
) -> Result<Option<Quantized4bit>> {
    let Some(state_key) = quant_state_key(t, weight_key) else {
        return Ok(None);
    };
    let bad = |key: &str, msg: String| PeftError::format(source, format!("tensor `{key}`: {msg}"));
    let state = parse_state(
        &t.remove(&state_key).expect("found").bytes,
        source,
        &state_key,
    )?;
    let key_type = state_key.rsplit("__").next().unwrap_or_default();
    let qtype = QuantType::from_name(&state.quant_type)
        .filter(|q| q.name() == key_type)
        .ok_or_else(|| {
            bad(
                &state_key,
                format!(
                    "unknown or inconsistent quant type `{}` (supported: nf4, fp4)",
                    state.quant_type
                ),
            )
        })?;
    if !BLOCK_SIZES.contains(&state.blocksize) {
        return Err(bad(
            &state_key,
            format!(
                "block size {} is not one of {BLOCK_SIZES:?}",
                state.blocksize
            ),
        ));
    }
    if state.shape != [out, inp] {
        return Err(PeftError::Shape {
            path: source.into(),
            key: weight_key.into(),
            expected: vec![out, inp],
            actual: state.shape,
        });
    }
    let numel = out * inp;
    let take = |t: &mut TensorMap, key: &str| {
        t.remove(key).ok_or_else(|| PeftError::MissingTensor {
            path: source.into(),
            key: key.into(),
        })
    };
    let packed = take(t, weight_key)?;
    if packed.dtype != StoredDtype::U8 || packed.numel() != numel.div_ceil(2) {
        return Err(bad(
            weight_key,
            format!(
                "expected {} packed U8 bytes for shape {:?}, found {} {} values",
                numel.div_ceil(2),
                [out, inp],
                packed.numel(),
                packed.dtype.name()
            ),
        ));
    }
    let quant_map_key = format!("{weight_key}.quant_map");
    let quant_map = take(t, &quant_map_key)?;
    if quant_map.data != qtype.code() {
        return Err(bad(
            &quant_map_key,
            format!("is not the {} codebook", qtype.name()),
        ));
    }
    let blocks = numel.div_ceil(state.blocksize);
    let absmax_key = format!("{weight_key}.absmax");
    let absmax_t = take(t, &absmax_key)?;
    if absmax_t.numel() != blocks {
        return Err(bad(
            &absmax_key,
            format!("holds {} scales, expected {blocks}", absmax_t.numel()),
        ));
    }
    let absmax = match state.nested_offset {
        None => {
            if absmax_t.dtype == StoredDtype::U8 {
                return Err(bad(
                    &absmax_key,
                    "is U8 (double-quantized) but the quant state has no nested_offset".into(),
                ));
            }
            Absmax::Plain(absmax_t.data)
        }
        Some(offset) => {
            if state.nested_blocksize != Some(NESTED_BLOCKSIZE) {
                return Err(bad(
                    &state_key,
                    format!(
                        "nested block size {:?} is not {NESTED_BLOCKSIZE}",
                        state.nested_blocksize
                    ),
                ));
            }
            if absmax_t.dtype != StoredDtype::U8 {
                return Err(bad(
                    &absmax_key,
                    format!(
                        "double-quantized scales must be U8, found {}",
                        absmax_t.dtype.name()
                    ),
                ));
            }
            let nested_key = format!("{weight_key}.nested_absmax");
            let nested = take(t, &nested_key)?;
            if nested.data.len() != blocks.div_ceil(NESTED_BLOCKSIZE) {
                return Err(bad(
                    &nested_key,
                    format!(
                        "holds {} values, expected {}",
                        nested.data.len(),
                        blocks.div_ceil(NESTED_BLOCKSIZE)
                    ),
                ));
            }
            let map_key = format!("{weight_key}.nested_quant_map");
            if take(t, &map_key)?.data != dynamic_map() {
                return Err(bad(
                    &map_key,
                    "is not bitsandbytes' signed 8-bit dynamic map".into(),
                ));
            }
            Absmax::Nested {
                q: absmax_t.bytes,
                nested_absmax: nested.data,
                offset,
            }
        }
    };
    Ok(Some(Quantized4bit {
        packed: packed.bytes,
        absmax,
        shape: vec![out, inp],
        blocksize: state.blocksize,
        qtype,
    }))
}

/// Put `q` into `t` under `weight_key` in bitsandbytes' layout. `dtype` is the torch name of
/// the weight's unquantized dtype (`float32`, `bfloat16`, `float16`), recorded in the state.
pub fn put_4bit(t: &mut TensorMap, weight_key: &str, q: &Quantized4bit, dtype: &str) {
    t.insert(
        weight_key,
        HostTensor::from_bytes(vec![q.packed.len(), 1], q.packed.as_slice()),
    );
    t.insert(
        format!("{weight_key}.quant_map"),
        HostTensor::new(vec![16], q.qtype.code().to_vec()),
    );
    let mut state = QuantStateJson {
        quant_type: q.qtype.name().into(),
        blocksize: q.blocksize,
        dtype: dtype.into(),
        shape: q.shape.clone(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    match &q.absmax {
        Absmax::Plain(v) => t.insert(
            format!("{weight_key}.absmax"),
            HostTensor::new(vec![v.len()], v.clone()),
        ),
        Absmax::Nested {
            q: codes,
            nested_absmax,
            offset,
        } => {
            t.insert(
                format!("{weight_key}.absmax"),
                HostTensor::from_bytes(vec![codes.len()], codes.as_slice()),
            );
            t.insert(
                format!("{weight_key}.nested_absmax"),
                HostTensor::new(vec![nested_absmax.len()], nested_absmax.clone()),
            );
            t.insert(
                format!("{weight_key}.nested_quant_map"),
                HostTensor::new(vec![256], dynamic_map().to_vec()),
            );
            state.nested_blocksize = Some(NESTED_BLOCKSIZE);
            state.nested_dtype = Some("float32".into());
            state.nested_offset = Some(*offset);
        }
    }
    let json = serde_json::to_vec(&state).expect("quant state serialises");
    t.insert(
        format!("{weight_key}.quant_state.bitsandbytes__{}", q.qtype.name()),
        HostTensor::from_bytes(vec![json.len()], json),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(double_quant: bool) -> Quantized4bit {
        let w: Vec<f32> = (0..40 * 24).map(|i| (i as f32 * 0.37).sin()).collect();
        Quantized4bit::quantize(&w, &[40, 24], QuantType::Nf4, 64, double_quant).unwrap()
    }

    #[test]
    fn put_then_take_round_trips_through_safetensors() {
        for dq in [false, true] {
            let q = sample(dq);
            let mut t = TensorMap::new();
            put_4bit(&mut t, "l.weight", &q, "float32");
            let bytes = t.to_safetensors_bytes(&[]).unwrap();
            let mut back = TensorMap::from_safetensors_bytes(Path::new("m"), &bytes).unwrap();
            let got = take_4bit(&mut back, Path::new("m"), "l.weight", 40, 24)
                .unwrap()
                .unwrap();
            assert_eq!(got, q);
            assert!(
                back.is_empty(),
                "every key consumed: {:?}",
                back.keys().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn bad_checkpoints_are_named_errors() {
        let q = sample(true);
        let mut t = TensorMap::new();
        put_4bit(&mut t, "l.weight", &q, "float32");
        let err = take_4bit(&mut t.clone(), Path::new("m"), "l.weight", 24, 40)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("l.weight") && err.contains("[24, 40]"),
            "{err}"
        );

        let mut corrupt = t.clone();
        corrupt.insert(
            "l.weight.quant_state.bitsandbytes__nf4",
            HostTensor::from_bytes(vec![3], *b"{no"),
        );
        let err = take_4bit(&mut corrupt, Path::new("m"), "l.weight", 40, 24)
            .unwrap_err()
            .to_string();
        assert!(err.contains("quant_state") && err.contains("JSON"), "{err}");

        let mut unknown = t.clone();
        let json = br#"{"quant_type":"int3","blocksize":64,"dtype":"float32","shape":[40,24]}"#;
        unknown.remove("l.weight.quant_state.bitsandbytes__nf4");
        unknown.insert(
            "l.weight.quant_state.bitsandbytes__int3",
            HostTensor::from_bytes(vec![json.len()], json),
        );
        let err = take_4bit(&mut unknown, Path::new("m"), "l.weight", 40, 24)
            .unwrap_err()
            .to_string();
        assert!(err.contains("int3"), "{err}");

        let mut short = t.clone();
        short.insert("l.weight", HostTensor::from_bytes(vec![10, 1], [0u8; 10]));
        let err = take_4bit(&mut short, Path::new("m"), "l.weight", 40, 24)
            .unwrap_err()
            .to_string();
        assert!(err.contains("480 packed"), "{err}");
    }
}
