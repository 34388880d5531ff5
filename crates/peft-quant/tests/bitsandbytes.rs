//! Bit-exactness with bitsandbytes 0.50.2 (fixtures from scripts/make_fixtures.py): packed
//! bytes, scales, double-quantized scales and dequantized values identical.

use std::path::{Path, PathBuf};

use peft_quant::{Absmax, QuantType, Quantized4bit, dynamic_map, quantize_blockwise_8bit};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bnb")
}

fn f32s(st: &safetensors::SafeTensors, key: &str) -> Vec<f32> {
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn to_dtype(v: f32, dtype: &str) -> f32 {
    match dtype {
        "float16" => half::f16::from_f32(v).to_f32(),
        "bfloat16" => half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

#[test]
fn dynamic_map_is_bitsandbytes() {
    let raw = std::fs::read(dir().join("dynamic_map.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let theirs = f32s(&st, "dynamic_map");
    let ours = dynamic_map();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "entry {i}: {a} vs {b}");
    }
}

#[test]
fn quantization_is_bit_exact() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("torch_sums.json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case.file_stem().unwrap().to_string_lossy().into_owned();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&case).unwrap()).unwrap();
        let raw = std::fs::read(case.with_extension("safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
        let shape: Vec<usize> = meta["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let qtype = QuantType::from_name(meta["quant_type"].as_str().unwrap()).unwrap();
        let blocksize = meta["blocksize"].as_u64().unwrap() as usize;
        let dq = meta["double_quant"].as_bool().unwrap();
        let dtype = meta["dtype"].as_str().unwrap();

        let q = Quantized4bit::quantize(&f32s(&st, "input"), &shape, qtype, blocksize, dq).unwrap();
        assert_eq!(
            q.packed,
            st.tensor("packed").unwrap().data(),
            "{name}: packed bytes"
        );
        match &q.absmax {
            Absmax::Plain(a) => assert_eq!(a, &f32s(&st, "absmax"), "{name}: absmax"),
            Absmax::Nested {
                q: qa,
                nested_absmax,
                offset,
            } => {
                assert_eq!(
                    offset.to_bits(),
                    f32s(&st, "offset")[0].to_bits(),
                    "{name}: offset"
                );
                assert_eq!(
                    qa.as_slice(),
                    st.tensor("absmax_q").unwrap().data(),
                    "{name}: quantized absmax"
                );
                assert_eq!(
                    nested_absmax,
                    &f32s(&st, "nested_absmax"),
                    "{name}: nested absmax"
                );
            }
        }
        let ours: Vec<f32> = q
            .dequantize()
            .into_iter()
            .map(|v| to_dtype(v, dtype))
            .collect();
        let theirs = f32s(&st, "dequantized");
        let diff = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(diff, 0, "{name}: {diff} dequantized values differ");
        if dq {
            assert!(
                q.bits_per_value() < 4.2,
                "{name}: {} bits per value",
                q.bits_per_value()
            );
        }
    }
}

/// The 8-bit quantization of the scales, alone, on 16384 values: codes identical, including
/// the values near a midpoint where bitsandbytes' lookup table picks the farther code.
#[test]
fn blockwise_8bit_is_bit_exact() {
    let raw = std::fs::read(dir().join("blockwise8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let input = f32s(&st, "input");
    let code = dynamic_map();
    let (q, absmax) = quantize_blockwise_8bit(&input, 256, &code);
    assert_eq!(absmax, f32s(&st, "absmax"));
    let theirs = st.tensor("codes").unwrap().data();
    let differ = (0..q.len()).filter(|&i| q[i] != theirs[i]).count();
    assert_eq!(differ, 0, "{differ} of {} codes differ", q.len());
    // The fixture does reach values where the nearest code is not bitsandbytes' choice.
    let not_nearest = q
        .iter()
        .zip(&input)
        .zip(input.chunks(256).flat_map(|b| {
            let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            std::iter::repeat_n(m, b.len())
        }))
        .filter(|&((&c, &v), m)| {
            let z = if m > 0.0 { v / m } else { 0.0 };
            let nearest = (0..256)
                .min_by(|&a, &b| (z - code[a]).abs().total_cmp(&(z - code[b]).abs()))
                .unwrap();
            (z - code[nearest]).abs() < (z - code[c as usize]).abs()
        })
        .count();
    assert!(
        not_nearest > 0,
        "no value exercises the lookup table's rounding"
    );
}

#[test]
fn bad_block_sizes_and_shapes_are_errors() {
    let err = Quantized4bit::quantize(&[0.0; 64], &[64], QuantType::Nf4, 48, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("48"), "{err}");
    let err = Quantized4bit::quantize(&[0.0; 64], &[8, 9], QuantType::Nf4, 64, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[8, 9]"), "{err}");
    assert!(peft_quant::dequantize_4bit(&[0u8; 3], &[1.0], 64, 64, QuantType::Nf4).is_err());
}

/// The double-quantization offset is `torch.mean(absmax)`: our sum adds in torch's order, so
/// it is bit-identical for every length torch sums on one thread.
#[test]
fn sums_in_torch_order() {
    let text = std::fs::read_to_string(dir().join("torch_sums.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    for c in cases {
        let n = c["n"].as_u64().unwrap();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 2654435761 + n) % (1 << 24)) as f32 / (1u64 << 24) as f32)
            .collect();
        let expected = f32::from_bits(c["sum_bits"].as_u64().unwrap() as u32);
        assert_eq!(peft_quant::torch_sum_f32(&x), expected, "n = {n}");
    }
}
