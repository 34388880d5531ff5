//! Which modules a method adapts, with the semantics of Hugging Face PEFT 0.21
//! (`check_target_module_exists`, `get_pattern_key`), so a config written for Python PEFT
//! selects the same modules here.
//!
//! Module paths are the Hugging Face ones (`model.layers.3.self_attn.q_proj`).

use indexmap::IndexMap;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{PeftError, Result};

/// `target_modules` / `exclude_modules` as Hugging Face writes them: a list of names (suffix
/// match on the module path), one string (a regex that must match the whole path), or the
/// shorthand `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    List(Vec<String>),
    Pattern(String),
}

impl ModuleSelector {
    /// `"all-linear"` (case-insensitive), as Hugging Face accepts it.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, ModuleSelector::Pattern(p) if p.eq_ignore_ascii_case("all-linear"))
    }

    /// Whether `path` is selected (suffix match for a list, full regex match for a string).
    /// `"all-linear"` is resolved by [`TargetSpec::matches`], which knows the module kind.
    pub fn matches(&self, path: &str) -> Result<bool> {
        Ok(match self {
            ModuleSelector::List(names) => names.iter().any(|n| suffix_match(path, n)),
            ModuleSelector::Pattern(p) => full_regex(p)?.is_match(path),
        })
    }
}

impl std::fmt::Display for ModuleSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSelector::List(l) => write!(f, "{l:?}"),
            ModuleSelector::Pattern(p) => write!(f, "\"{p}\""),
        }
    }
}

/// `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    One(usize),
    Many(Vec<usize>),
}

impl LayerIndices {
    fn contains(&self, idx: usize) -> bool {
        match self {
            LayerIndices::One(i) => *i == idx,
            LayerIndices::Many(v) => v.contains(&idx),
        }
    }
    fn is_empty(&self) -> bool {
        matches!(self, LayerIndices::Many(v) if v.is_empty())
    }

    /// The largest index, if any.
    pub fn max(&self) -> Option<usize> {
        match self {
            LayerIndices::One(i) => Some(*i),
            LayerIndices::Many(v) => v.iter().copied().max(),
        }
    }
}

/// `layers_pattern`: one name or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    One(String),
    Many(Vec<String>),
}

/// What a module slot is, for `"all-linear"` (which takes linear layers but not the output
/// head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Linear,
    /// The language-model head or classifier: never taken by `"all-linear"`.
    OutputHead,
    Embedding,
}

/// The target part of an adapter config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetSpec {
    pub target_modules: Option<ModuleSelector>,
    pub exclude_modules: Option<ModuleSelector>,
    pub layers_to_transform: Option<LayerIndices>,
    pub layers_pattern: Option<LayersPattern>,
    /// Modules trained and saved whole (never adapted).
    pub modules_to_save: Vec<String>,
}

impl TargetSpec {
    /// Whether the module at `path` (of `kind`) is adapted.
    pub fn matches(&self, path: &str, kind: ModuleKind) -> Result<bool> {
        if let Some(ex) = &self.exclude_modules
            && ex.matches(path)?
        {
            return Ok(false);
        }
        if in_saved_module(path, &self.modules_to_save) {
            return Ok(false);
        }
        let Some(targets) = &self.target_modules else {
            return Ok(false);
        };
        if targets.is_all_linear() {
            return Ok(kind == ModuleKind::Linear && self.layer_allowed(path)?);
        }
        match targets {
            ModuleSelector::Pattern(p) => Ok(full_regex(p)?.is_match(path)),
            ModuleSelector::List(_) => Ok(targets.matches(path)? && self.layer_allowed(path)?),
        }
    }

    /// Resolve the targets against the module paths of a model; an empty selection is an
    /// error listing what exists.
    pub fn select<'a>(
        &self,
        modules: impl IntoIterator<Item = (&'a str, ModuleKind)> + Clone,
    ) -> Result<Vec<String>> {
        let mut selected = Vec::new();
        for (path, kind) in modules.clone() {
            if self.matches(path, kind)? {
                selected.push(path.to_string());
            }
        }
        if selected.is_empty() {
            let available: Vec<&str> = modules.into_iter().map(|(p, _)| p).collect();
            let shown = if available.len() > 12 {
                format!(
                    "{} ... ({} in all)",
                    available[..12].join(", "),
                    available.len()
                )
            } else {
                available.join(", ")
            };
            return Err(PeftError::NoTargetMatch {
                targets: self
                    .target_modules
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "(none)".into()),
                available: shown,
            });
        }
        Ok(selected)
    }

    /// Whether `path` lies in a layer of `layers_to_transform` (always, when unset; never for a
    /// module outside the numbered layers, as Hugging Face PEFT has it). Hugging Face reads the
    /// first numbered segment after a `layers_pattern` name (or after any name without one).
    pub fn layer_allowed(&self, path: &str) -> Result<bool> {
        let Some(indices) = &self.layers_to_transform else {
            return Ok(true);
        };
        if indices.is_empty() {
            return Ok(true);
        }
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![],
            Some(LayersPattern::One(p)) if p.is_empty() => vec![],
            Some(LayersPattern::One(p)) => vec![p.clone()],
            Some(LayersPattern::Many(v)) => v.clone(),
        };
        let idx = if patterns.is_empty() {
            Regex::new(r"^.*?\.[^.]*\.(\d+)\.")
                .unwrap()
                .captures(path)
                .map(|c| c[1].to_string())
        } else {
            let mut found = None;
            for p in &patterns {
                let re = Regex::new(&format!(r"^(?:.*?\.)?{p}\.(\d+)\.")).map_err(|e| {
                    PeftError::Config(format!("layers_pattern `{p}`: {}", one_line(&e)))
                })?;
                if let Some(c) = re.captures(path) {
                    found = Some(c[1].to_string());
                    break;
                }
            }
            found
        };
        Ok(idx
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| indices.contains(i)))
    }
}

/// Hugging Face PEFT's default LoRA targets for `model_type` (its LoRA mapping, which AdaLoRA
/// and Super-Tuning reuse), or `None` for a model type it has none for.
pub fn lora_default_targets(model_type: &str) -> Option<ModuleSelector> {
    let names: &[&str] = match model_type {
        "llama" | "mistral" | "qwen2" => &["q_proj", "v_proj"],
        "bert" | "roberta" => &["query", "value"],
        _ => return None,
    };
    Some(ModuleSelector::List(
        names.iter().map(|s| s.to_string()).collect(),
    ))
}

/// Whether the module at `path` is, or sits inside, a module named in `modules_to_save`
/// (a name matches a module whose path ends with it at a dot boundary). One rule for both
/// sides: such modules are never adapted, and they are trained and saved whole.
pub fn in_saved_module(path: &str, modules_to_save: &[String]) -> bool {
    let ends: Vec<usize> = path
        .match_indices('.')
        .map(|(i, _)| i)
        .chain([path.len()])
        .collect();
    ends.iter().any(|&end| {
        modules_to_save
            .iter()
            .any(|m| suffix_match(&path[..end], m))
    })
}

/// Hugging Face `get_pattern_key`: the first key of `patterns`, in the order the config lists
/// them, that matches the end of `path` at a dot boundary (`(.*\.)?(key)$`), for
/// `rank_pattern` and `alpha_pattern`.
pub fn pattern_value<'a, T>(
    patterns: &'a IndexMap<String, T>,
    path: &str,
) -> Result<Option<&'a T>> {
    for (key, value) in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map_err(|e| PeftError::Config(format!("pattern `{key}`: {}", one_line(&e))))?;
        if re.is_match(path) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn suffix_match(path: &str, name: &str) -> bool {
    path == name
        || (path.len() > name.len()
            && path.ends_with(name)
            && path.as_bytes()[path.len() - name.len() - 1] == b'.')
}

fn full_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| PeftError::Config(format!("target regex `{pattern}`: {}", one_line(&e))))
}

/// The regex crate explains a syntax error over several lines (the pattern, a caret, the
/// reason); errors here are one line, so keep the reason.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim();
    last.strip_prefix("error: ").unwrap_or(last).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Option<ModuleSelector> {
        Some(ModuleSelector::List(
            v.iter().map(|s| s.to_string()).collect(),
        ))
    }

    #[test]
    fn list_is_a_suffix_match_on_dot_boundaries() {
        let spec = TargetSpec {
            target_modules: list(&["q_proj", "v_proj"]),
            ..Default::default()
        };
        assert!(
            spec.matches("model.layers.0.self_attn.q_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(
            !spec
                .matches("model.layers.0.self_attn.xq_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(
            !spec
                .matches("model.layers.0.self_attn.k_proj", ModuleKind::Linear)
                .unwrap()
        );
    }

    #[test]
    fn string_is_a_full_regex_match() {
        let spec = TargetSpec {
            target_modules: Some(ModuleSelector::Pattern(
                r".*\.1\.self_attn\.(q|v)_proj".into(),
            )),
            ..Default::default()
        };
        assert!(
            spec.matches("model.layers.1.self_attn.v_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(
            !spec
                .matches("model.layers.11.self_attn.v_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(
            !spec
                .matches("model.layers.1.self_attn.v_proj.x", ModuleKind::Linear)
                .unwrap()
        );
    }

    #[test]
    fn all_linear_skips_the_output_head() {
        let spec = TargetSpec {
            target_modules: Some(ModuleSelector::Pattern("all-linear".into())),
            ..Default::default()
        };
        assert!(
            spec.matches("model.layers.0.mlp.up_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(!spec.matches("lm_head", ModuleKind::OutputHead).unwrap());
    }

    #[test]
    fn exclude_and_layers_to_transform() {
        let spec = TargetSpec {
            target_modules: list(&["q_proj", "v_proj"]),
            exclude_modules: list(&["v_proj"]),
            layers_to_transform: Some(LayerIndices::Many(vec![1])),
            layers_pattern: Some(LayersPattern::One("layers".into())),
            ..Default::default()
        };
        assert!(
            !spec
                .matches("model.layers.0.self_attn.q_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(
            spec.matches("model.layers.1.self_attn.q_proj", ModuleKind::Linear)
                .unwrap()
        );
        assert!(
            !spec
                .matches("model.layers.1.self_attn.v_proj", ModuleKind::Linear)
                .unwrap()
        );
    }

    #[test]
    fn no_match_lists_what_exists() {
        let spec = TargetSpec {
            target_modules: list(&["nope"]),
            ..Default::default()
        };
        let err = spec
            .select([("model.layers.0.mlp.up_proj", ModuleKind::Linear)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("model.layers.0.mlp.up_proj"),
            "{err}"
        );
    }

    #[test]
    fn pattern_value_matches_at_dot_boundaries() {
        let mut p = IndexMap::new();
        p.insert("layers.0.self_attn.q_proj".to_string(), 4usize);
        assert_eq!(
            pattern_value(&p, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(&4)
        );
        assert_eq!(
            pattern_value(&p, "model.layers.10.self_attn.q_proj").unwrap(),
            None
        );
    }

    #[test]
    fn pattern_value_takes_the_first_match_in_the_config_order() {
        // Sorted order would put "q_proj" before "self_attn.q_proj"; the JSON lists it second.
        let p: IndexMap<String, usize> =
            serde_json::from_str(r#"{"self_attn.q_proj": 2, "q_proj": 6}"#).unwrap();
        assert_eq!(
            pattern_value(&p, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(&2)
        );
        let p: IndexMap<String, usize> =
            serde_json::from_str(r#"{"q_proj": 6, "self_attn.q_proj": 2}"#).unwrap();
        assert_eq!(
            pattern_value(&p, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(&6)
        );
    }

    #[test]
    fn saved_modules_cover_their_children() {
        let names = vec!["pooler".to_string(), "classifier".to_string()];
        assert!(in_saved_module("bert.pooler.dense", &names));
        assert!(in_saved_module("classifier", &names));
        assert!(!in_saved_module(
            "bert.encoder.layer.0.attention.self.query",
            &names
        ));
        assert!(!in_saved_module("bert.xpooler.dense", &names));
        // Names are matched literally, never as a regex.
        assert!(!in_saved_module(
            "bert.pooler.dense",
            &["pool.r".to_string()]
        ));
        let spec = TargetSpec {
            target_modules: Some(ModuleSelector::Pattern("all-linear".into())),
            modules_to_save: names,
            ..Default::default()
        };
        assert!(
            !spec
                .matches("bert.pooler.dense", ModuleKind::Linear)
                .unwrap()
        );
    }

    proptest::proptest! {
        #[test]
        fn suffix_match_agrees_with_the_python_rule(prefix in "[a-z]{0,3}(\\.[a-z0-9]{1,3}){0,3}", name in "[a-z_]{1,6}") {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            proptest::prop_assert!(suffix_match(&path, &name));
            let glued = format!("{prefix}{name}");
            let python = glued == name || glued.ends_with(&format!(".{name}"));
            proptest::prop_assert_eq!(suffix_match(&glued, &name), python);
        }
    }
}
