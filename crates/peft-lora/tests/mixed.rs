//! Mixed-batch inference (PEFT's `adapter_names=`): one batched pass where each row uses its
//! own LoRA adapter gives each row what that adapter alone gives it.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::adapter_io::{WEIGHTS_FILE, load_adapter};
use peft_core::tuner::Tuner;
use peft_lora::{LoraConfig, LoraLayer, SiteHost};
use peft_models::generate::{greedy, greedy_batch};
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::load_causal_lm;
use peft_models::reference::max_abs_diff;
use peft_sites::{BASE_ROW, SiteMut, set_row_adapters};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny Llama with the random LoRA adapters `a` (q, v) and `c` (q, v, rank 2) of the
/// combination fixtures.
fn model(device: &Device) -> LlamaForCausalLM {
    let mut m = load_causal_lm(&fixtures().join("lora_tiny/base_plain"), device)
        .unwrap()
        .model;
    for name in ["a", "c"] {
        let files = load_adapter(&fixtures().join("combine_tiny/adapters").join(name)).unwrap();
        let config = LoraConfig::from_json(&files.config).unwrap();
        m = config.apply(m, name).unwrap();
        m = config
            .load_state(m, name, files.tensors, &files.dir.join(WEIGHTS_FILE))
            .unwrap();
    }
    m
}

/// Only adapter `name` active (none for `__base__`).
fn only(model: &mut LlamaForCausalLM, name: &str) {
    for (_, site) in model.sites_mut() {
        if let SiteMut::Linear(l) | SiteMut::Head(l) = site {
            let names: Vec<&str> = if name == BASE_ROW || l.part(name).is_none() {
                vec![]
            } else {
                vec![name]
            };
            l.set_active(&names).unwrap();
        }
    }
}

#[test]
fn each_row_gets_its_own_adapter() {
    let device = Device::flex();
    let mut m = model(&device);
    let rows: Vec<String> = ["a", "c", BASE_ROW, "a"].map(String::from).to_vec();
    let ids: Vec<i64> = (0..4 * 6).map(|i| (i * 7 + 3) % 100).collect();
    let batch = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [4, 6]), &device);
    set_row_adapters(&mut m, Some(&rows)).unwrap();
    let mixed = m.forward(batch, None);
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 42, 9],
        vec![8, 3],
        vec![11, 12, 13, 14, 15],
        vec![5, 17, 42, 9],
    ];
    let mixed_text = greedy_batch(&m, &prompts, 6, &[]);
    set_row_adapters(&mut m, None).unwrap();
    let mut differs = false;
    for (i, name) in rows.iter().enumerate() {
        only(&mut m, name);
        let row = Tensor::<2, Int>::from_data(
            TensorData::new(ids[i * 6..(i + 1) * 6].to_vec(), [1, 6]),
            &device,
        );
        let alone = m.forward(row, None);
        let err = max_abs_diff(mixed.clone().narrow(0, i, 1), alone.clone());
        assert!(err < 1e-5, "row {i} ({name}): {err}");
        only(&mut m, BASE_ROW);
        let ids_row = Tensor::<2, Int>::from_data(
            TensorData::new(ids[i * 6..(i + 1) * 6].to_vec(), [1, 6]),
            &device,
        );
        differs |= max_abs_diff(m.forward(ids_row, None), alone) > 1e-3;
        only(&mut m, name);
        assert_eq!(
            mixed_text[i],
            greedy(&m, &prompts[i], 6, &[]),
            "row {i} ({name}): greedy text"
        );
    }
    assert!(differs, "the adapters change the output");
}

#[test]
fn mixed_batches_refuse_what_peft_refuses() {
    let device = Device::flex();
    let mut m = model(&device);
    let err = set_row_adapters(&mut m, Some(&["zz".to_string()]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("zz"), "{err}");
    for (_, site) in m.sites_mut() {
        if let SiteMut::Linear(l) = site
            && l.part("c").is_some()
        {
            l.enable_dora("c").unwrap();
        }
    }
    let err = set_row_adapters(&mut m, Some(&["c".to_string()]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
}
