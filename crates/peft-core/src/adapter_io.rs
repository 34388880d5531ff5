//! The Hugging Face PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! The config is kept as JSON so that keys written by newer PEFT versions survive a load and
//! a save; each method deserialises the fields it knows from it. Tensor keys carry no adapter
//! name (`base_model.model.<module>.lora_A.weight`); an adapter not named `default` lives in a
//! sub-folder named after it, as Python PEFT writes it.
//!
//! The same reader takes AdapterHub `adapters` folders (`adapter_config.json` whose `config`
//! object holds the method's fields, `adapter.safetensors`, and optionally a static head in
//! `model_head.safetensors`): see [`is_adapterhub_config`].

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::tensors::{TensorMap, write_atomic};
use crate::{PeftError, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix of every adapter tensor key (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";
/// AdapterHub's weights file (`save_adapter(..., use_safetensors=True)`).
pub const ADAPTERHUB_WEIGHTS_FILE: &str = "adapter.safetensors";
/// AdapterHub's static head weights (e.g. a classifier trained with the adapter).
pub const ADAPTERHUB_HEAD_FILE: &str = "model_head.safetensors";
/// The config of [`ADAPTERHUB_HEAD_FILE`].
pub const ADAPTERHUB_HEAD_CONFIG: &str = "head_config.json";
/// AdapterHub's AdapterFusion config (in place of `adapter_config.json`).
pub const ADAPTERHUB_FUSION_CONFIG: &str = "adapter_fusion_config.json";
/// AdapterHub's AdapterFusion weights.
pub const ADAPTERHUB_FUSION_WEIGHTS: &str = "model_adapter_fusion.safetensors";
/// The method name AdapterHub fusion folders dispatch under.
pub const FUSION_TYPE: &str = "FUSION";
/// The method name AdapterHub bottleneck adapters dispatch under (their layout has no
/// `peft_type`; the registry lists them under this one).
pub const BOTTLENECK_TYPE: &str = "BOTTLENECK";

/// Whether an `adapter_config.json` is AdapterHub's: no `peft_type`, a `config` object and a
/// `version` of `adapters.*`.
pub fn is_adapterhub_config(config: &Value) -> bool {
    config.get("peft_type").is_none()
        && config.get("config").is_some_and(Value::is_object)
        && config
            .get("version")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("adapters."))
}

/// The method of an AdapterHub config: `config.architecture` (absent or null for bottleneck
/// adapters) as the type the registry dispatches on.
fn adapterhub_type(path: &Path, config: &Value) -> Result<&'static str> {
    if config.get("adapter_names").is_some() {
        return Ok(FUSION_TYPE);
    }
    match config["config"].get("architecture").and_then(Value::as_str) {
        None | Some("bottleneck") => Ok(BOTTLENECK_TYPE),
        Some(other) => Err(PeftError::format(
            path,
            format!("AdapterHub `{other}` adapters are not supported (bottleneck adapters are)"),
        )),
    }
}

/// An adapter as stored on disk.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    /// The parsed `adapter_config.json`.
    pub config: Value,
    /// The tensors of `adapter_model.safetensors`, keys as stored.
    pub tensors: TensorMap,
    /// The folder it was read from.
    pub dir: PathBuf,
    /// The weights file read (named in errors about its tensors).
    pub weights: PathBuf,
}

impl AdapterFiles {
    /// The `peft_type` of the config (`LORA`, `IA3`, ...; [`BOTTLENECK_TYPE`] or
    /// [`FUSION_TYPE`] for AdapterHub's folders).
    pub fn peft_type(&self) -> Result<&str> {
        if is_adapterhub_config(&self.config) {
            return adapterhub_type(&self.dir.join(CONFIG_FILE), &self.config);
        }
        self.config
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                PeftError::format(
                    self.dir.join(CONFIG_FILE),
                    "missing string field `peft_type`",
                )
            })
    }

    /// Fail unless the adapter is of `expected` type.
    pub fn expect_type(&self, expected: &str) -> Result<()> {
        let found = self.peft_type()?;
        if found != expected {
            return Err(PeftError::format(
                self.dir.join(CONFIG_FILE),
                format!("adapter is `{found}`, expected `{expected}`"),
            ));
        }
        Ok(())
    }
}

/// Folder of adapter `name` under `root` (the root itself for `default`).
pub fn adapter_dir(root: &Path, name: &str) -> PathBuf {
    if name == "default" {
        root.to_path_buf()
    } else {
        root.join(name)
    }
}

/// Read an adapter folder (or an AdapterHub fusion folder: `adapter_fusion_config.json` +
/// `model_adapter_fusion.safetensors`).
pub fn load_adapter(dir: &Path) -> Result<AdapterFiles> {
    let fusion_config = dir.join(ADAPTERHUB_FUSION_CONFIG);
    if !dir.join(CONFIG_FILE).exists() && fusion_config.exists() {
        let bytes = std::fs::read(&fusion_config).map_err(|e| PeftError::io(&fusion_config, e))?;
        let config = parse_config(&fusion_config, &bytes)?;
        if !is_adapterhub_config(&config) || config.get("adapter_names").is_none() {
            return Err(PeftError::format(
                &fusion_config,
                "expected AdapterHub's fusion config (`adapter_names`, `config`, `version`)",
            ));
        }
        let weights = dir.join(ADAPTERHUB_FUSION_WEIGHTS);
        let mut tensors = read_weights(
            &weights,
            "pytorch_model_adapter_fusion.bin",
            "save_adapter_fusion(..., use_safetensors=True)",
        )?;
        add_head(dir, &mut tensors, ADAPTERHUB_FUSION_WEIGHTS)?;
        return Ok(AdapterFiles {
            config,
            tensors,
            dir: dir.to_path_buf(),
            weights,
        });
    }
    let config_path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&config_path).map_err(|e| PeftError::io(&config_path, e))?;
    let config = parse_config(&config_path, &bytes)?;
    if is_adapterhub_config(&config) {
        return load_adapterhub(dir, config);
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tensors = read_weights(&weights, "adapter_model.bin", "safe_serialization=True")?;
    let files = AdapterFiles {
        config,
        tensors,
        dir: dir.to_path_buf(),
        weights,
    };
    files.peft_type()?;
    Ok(files)
}

/// The tensors of the safetensors file `weights`; where only the pickled twin `pickled` (in
/// the same folder) exists, an error saying how to re-save it (`resave`).
fn read_weights(weights: &Path, pickled: &str, resave: &str) -> Result<TensorMap> {
    if weights.exists() {
        return TensorMap::read_safetensors(weights);
    }
    let pickled = weights.with_file_name(pickled);
    if pickled.exists() {
        return Err(PeftError::format(
            pickled,
            format!("pickled PyTorch adapters are not supported; re-save it with {resave}"),
        ));
    }
    Err(PeftError::io(
        weights,
        std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
    ))
}

/// Read an AdapterHub folder: `adapter.safetensors`, plus the static head's tensors from
/// `model_head.safetensors` when there is one (their keys, e.g. `classifier.weight`, never
/// meet the adapter's).
fn load_adapterhub(dir: &Path, config: Value) -> Result<AdapterFiles> {
    adapterhub_type(&dir.join(CONFIG_FILE), &config)?;
    let weights = dir.join(ADAPTERHUB_WEIGHTS_FILE);
    let mut tensors = read_weights(
        &weights,
        "pytorch_adapter.bin",
        "save_adapter(..., use_safetensors=True)",
    )?;
    add_head(dir, &mut tensors, ADAPTERHUB_WEIGHTS_FILE)?;
    Ok(AdapterFiles {
        config,
        tensors,
        dir: dir.to_path_buf(),
        weights,
    })
}

/// Add the static head's tensors of `dir` (`model_head.safetensors`, when there is one) to
/// `tensors`, read from `weights_file`: their keys (e.g. `classifier.weight`) never meet the
/// adapter's or the fusion's.
fn add_head(dir: &Path, tensors: &mut TensorMap, weights_file: &str) -> Result<()> {
    let head = dir.join(ADAPTERHUB_HEAD_FILE);
    if !head.exists() {
        return Ok(());
    }
    for (key, t) in TensorMap::read_safetensors(&head)?.tensors {
        if tensors.get(&key).is_some() {
            return Err(PeftError::format(
                &head,
                format!("`{key}` is also in {weights_file}"),
            ));
        }
        tensors.insert(key, t);
    }
    Ok(())
}

/// Parse the bytes of an `adapter_config.json` (`path` names it in errors): a JSON object with
/// a string `peft_type`.
pub fn parse_config(path: &Path, bytes: &[u8]) -> Result<Value> {
    let config: Value = serde_json::from_slice(bytes)
        .map_err(|e| PeftError::format(path, format!("invalid JSON: {e}")))?;
    if !config.is_object() {
        return Err(PeftError::format(path, "expected a JSON object"));
    }
    if !config.get("peft_type").is_some_and(Value::is_string) && !is_adapterhub_config(&config) {
        return Err(PeftError::format(path, "missing string field `peft_type`"));
    }
    Ok(config)
}

/// A method's config from an `adapter_config.json` value: field errors name the field, and a
/// config of another method (its `peft_type` is not `peft_type`; `what` names the method in
/// the message, e.g. "a BEFT") is an error.
pub fn method_config<T: serde::de::DeserializeOwned>(
    value: &Value,
    peft_type: &str,
    what: &str,
) -> Result<T> {
    let config: T = crate::error::from_json_value(value.clone())
        .map_err(|e| PeftError::Config(format!("adapter_config.json: {e}")))?;
    let found = value
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or(peft_type);
    if found != peft_type {
        return Err(PeftError::Config(format!(
            "peft_type is `{found}`, this is {what} config (`{peft_type}`)"
        )));
    }
    Ok(config)
}

/// Write an AdapterHub fusion folder: `model_adapter_fusion.safetensors` and
/// `adapter_fusion_config.json`, and the static head trained with it when `head` has tensors.
pub fn save_adapterhub_fusion(
    dir: &Path,
    config: &Value,
    tensors: &TensorMap,
    head: Option<(&Value, &TensorMap)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    tensors.write_safetensors(&dir.join(ADAPTERHUB_FUSION_WEIGHTS))?;
    write_head(dir, head)?;
    write_json(&dir.join(ADAPTERHUB_FUSION_CONFIG), config)
}

fn write_head(dir: &Path, head: Option<(&Value, &TensorMap)>) -> Result<()> {
    if let Some((head_config, head_tensors)) = head {
        head_tensors.write_safetensors(&dir.join(ADAPTERHUB_HEAD_FILE))?;
        write_json(&dir.join(ADAPTERHUB_HEAD_CONFIG), head_config)?;
    }
    Ok(())
}

/// Write an AdapterHub folder: `adapter.safetensors` and the config (sorted keys, as
/// AdapterHub writes them), and the static head when `head` has tensors.
pub fn save_adapterhub(
    dir: &Path,
    config: &Value,
    tensors: &TensorMap,
    head: Option<(&Value, &TensorMap)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    tensors.write_safetensors(&dir.join(ADAPTERHUB_WEIGHTS_FILE))?;
    write_head(dir, head)?;
    write_json(&dir.join(CONFIG_FILE), config)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| PeftError::Other(format!("cannot serialise {}: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

/// Write an adapter folder: weights first, then the config, each atomically.
pub fn save_adapter(dir: &Path, config: &Value, tensors: &TensorMap) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    tensors.write_safetensors(&dir.join(WEIGHTS_FILE))?;
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| PeftError::Other(format!("cannot serialise adapter config: {e}")))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::HostTensor;

    #[test]
    fn round_trip_keeps_unknown_config_keys() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"peft_type": "LORA", "r": 4, "some_future_key": [1, 2]});
        let mut t = TensorMap::new();
        t.insert(
            "base_model.model.x.lora_A.weight",
            HostTensor::new(vec![1, 2], vec![1., 2.]),
        );
        save_adapter(dir.path(), &config, &t).unwrap();
        let back = load_adapter(dir.path()).unwrap();
        assert_eq!(back.config, config);
        assert_eq!(back.tensors, t);
        back.expect_type("LORA").unwrap();
        let err = back.expect_type("IA3").unwrap_err().to_string();
        assert!(err.contains("LORA") && err.contains("IA3"), "{err}");
    }

    #[test]
    fn missing_peft_type_and_missing_files_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_adapter(dir.path()).unwrap_err().to_string();
        assert!(err.contains(CONFIG_FILE), "{err}");
        std::fs::write(dir.path().join(CONFIG_FILE), "{\"r\": 8}").unwrap();
        TensorMap::new()
            .write_safetensors(&dir.path().join(WEIGHTS_FILE))
            .unwrap();
        let err = load_adapter(dir.path()).unwrap_err().to_string();
        assert!(err.contains("peft_type"), "{err}");
    }
}
