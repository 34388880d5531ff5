//! The sites of a model, addressed by Hugging Face module path.
//!
//! A model declares its sites once per module type with [`site_table!`], and implements
//! [`SiteHost`] by walking its layers; every list a method needs (linear paths, norm paths,
//! target candidates) is derived from that.

use peft_core::Result;
use peft_core::params::frozen;
use peft_core::target::ModuleKind;
use peft_quant::BaseLinear;

use crate::bottleneck::SublayerSite;
use crate::linear::TunedLinear;
use crate::norm::TunedNorm;
use crate::prompt::PromptSite;

/// What kind of site sits at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    /// A linear projection inside the network.
    Linear,
    /// The output head or classifier: a linear, never taken by `"all-linear"`.
    Head,
    /// An RMSNorm or LayerNorm.
    Norm,
    /// Virtual tokens: before the input embeddings, or keys/values of every attention layer.
    Prompt,
    /// The output of a layer's attention or feed-forward block (bottleneck adapters).
    Sublayer,
}

/// A site, shared.
pub enum Site<'a> {
    Linear(&'a TunedLinear),
    Head(&'a TunedLinear),
    Norm(&'a TunedNorm),
    Prompt(&'a PromptSite),
    Sublayer(&'a SublayerSite),
}

/// A site, mutable.
pub enum SiteMut<'a> {
    Linear(&'a mut TunedLinear),
    Head(&'a mut TunedLinear),
    Norm(&'a mut TunedNorm),
    Prompt(&'a mut PromptSite),
    Sublayer(&'a mut SublayerSite),
}

impl Site<'_> {
    pub fn kind(&self) -> SiteKind {
        match self {
            Site::Linear(_) => SiteKind::Linear,
            Site::Head(_) => SiteKind::Head,
            Site::Norm(_) => SiteKind::Norm,
            Site::Prompt(_) => SiteKind::Prompt,
            Site::Sublayer(_) => SiteKind::Sublayer,
        }
    }
}

/// A field that may be absent (`Option<T>`) or always there (`T`); lets [`site_table!`] list
/// both the same way.
pub trait Present<'a, T> {
    fn present(self) -> Option<&'a T>;
}

impl<'a, T> Present<'a, T> for &'a T {
    fn present(self) -> Option<&'a T> {
        Some(self)
    }
}

impl<'a, T> Present<'a, T> for &'a Option<T> {
    fn present(self) -> Option<&'a T> {
        self.as_ref()
    }
}

/// [`Present`], mutable.
pub trait PresentMut<'a, T> {
    fn present_mut(self) -> Option<&'a mut T>;
}

impl<'a, T> PresentMut<'a, T> for &'a mut T {
    fn present_mut(self) -> Option<&'a mut T> {
        Some(self)
    }
}

impl<'a, T> PresentMut<'a, T> for &'a mut Option<T> {
    fn present_mut(self) -> Option<&'a mut T> {
        self.as_mut()
    }
}

/// Declare the sites of a module type once: `"hf.path" => Kind(field.path)` entries, where
/// `Kind` is `Linear`, `Head` or `Norm` and the field is a `TunedLinear`/`TunedNorm` or an
/// `Option` of one, or `Each`, a `Vec` of modules with their own table, numbered from 0 under
/// the path (`"model.layers" => Each(model.layers)` gives `model.layers.3.<their paths>`).
/// Generates `site_list(&self)` and `site_list_mut(&mut self)`: the sites by path relative to
/// the module, in the order given.
#[macro_export]
macro_rules! site_table {
    ($ty:ty { $($name:literal => $kind:ident ( $($field:tt)+ )),* $(,)? }) => {
        impl $ty {
            /// The sites of this module, by Hugging Face path relative to it.
            pub fn site_list(&self) -> Vec<(String, $crate::Site<'_>)> {
                let mut sites = Vec::new();
                $( $crate::site_table!(@push sites, $name, $kind, &self.$($field)+, site_list, Present, present, Site); )*
                sites
            }

            /// The sites of this module, mutable.
            pub fn site_list_mut(&mut self) -> Vec<(String, $crate::SiteMut<'_>)> {
                let mut sites = Vec::new();
                $( $crate::site_table!(@push sites, $name, $kind, &mut self.$($field)+, site_list_mut, PresentMut, present_mut, SiteMut); )*
                sites
            }
        }
    };
    (@push $sites:ident, $name:literal, Each, $field:expr, $list:ident, $p:ident, $pf:ident, $site:ident) => {
        for (i, m) in ($field).into_iter().enumerate() {
            for (n, s) in m.$list() {
                $sites.push((format!("{}.{i}.{n}", $name), s));
            }
        }
    };
    (@push $sites:ident, $name:literal, $kind:ident, $field:expr, $list:ident, $p:ident, $pf:ident, $site:ident) => {
        if let Some(s) = $crate::host::$p::$pf($field) {
            $sites.push(($name.to_string(), $crate::$site::$kind(s)));
        }
    };
}

/// A model whose sites are addressed by Hugging Face module path (implement it with the
/// `site_list` functions [`site_table!`] generates).
pub trait SiteHost {
    /// The Hugging Face `model_type` (`"llama"`, `"bert"`): the key of the per-model default
    /// targets of methods such as IA3 and LN tuning.
    fn model_type(&self) -> &'static str;

    /// Every site with its full path, in model order.
    fn sites(&self) -> Vec<(String, Site<'_>)>;

    /// Every site with its full path, mutable.
    fn sites_mut(&mut self) -> Vec<(String, SiteMut<'_>)>;

    /// Every linear site (head included) with its path.
    fn linears(&self) -> Vec<(String, &TunedLinear)> {
        self.sites()
            .into_iter()
            .filter_map(|(p, s)| match s {
                Site::Linear(l) | Site::Head(l) => Some((p, l)),
                _ => None,
            })
            .collect()
    }

    /// The number of numbered layers: one more than the highest index in a site's path.
    fn num_layers(&self) -> usize {
        self.sites()
            .iter()
            .filter_map(|(path, _)| path.split('.').find_map(|part| part.parse::<usize>().ok()))
            .max()
            .map_or(0, |i| i + 1)
    }

    /// The linear site at `path`.
    fn linear_mut(&mut self, path: &str) -> Option<&mut TunedLinear> {
        self.sites_mut().into_iter().find_map(|(p, s)| match s {
            SiteMut::Linear(l) | SiteMut::Head(l) if p == path => Some(l),
            _ => None,
        })
    }

    /// Every norm site with its path.
    fn norms(&self) -> Vec<(String, &TunedNorm)> {
        self.sites()
            .into_iter()
            .filter_map(|(p, s)| match s {
                Site::Norm(n) => Some((p, n)),
                _ => None,
            })
            .collect()
    }

    /// The norm site at `path`.
    fn norm_mut(&mut self, path: &str) -> Option<&mut TunedNorm> {
        self.sites_mut().into_iter().find_map(|(p, s)| match s {
            SiteMut::Norm(n) if p == path => Some(n),
            _ => None,
        })
    }

    /// Every virtual-token site with its path.
    fn prompt_sites(&self) -> Vec<(String, &PromptSite)> {
        self.sites()
            .into_iter()
            .filter_map(|(p, s)| match s {
                Site::Prompt(v) => Some((p, v)),
                _ => None,
            })
            .collect()
    }

    /// The virtual-token site for `place`, mutable (`None`: the model has none there).
    fn prompt_site_mut(&mut self, place: crate::prompt::PromptPlace) -> Option<&mut PromptSite> {
        self.sites_mut().into_iter().find_map(|(_, s)| match s {
            SiteMut::Prompt(v) if v.place == place => Some(v),
            _ => None,
        })
    }

    /// Every sub-layer output site with its path.
    fn sublayers(&self) -> Vec<(String, &SublayerSite)> {
        self.sites()
            .into_iter()
            .filter_map(|(p, s)| match s {
                Site::Sublayer(v) => Some((p, v)),
                _ => None,
            })
            .collect()
    }

    /// The sub-layer output site at `path`, mutable.
    fn sublayer_mut(&mut self, path: &str) -> Option<&mut SublayerSite> {
        self.sites_mut().into_iter().find_map(|(p, s)| match s {
            SiteMut::Sublayer(v) if p == path => Some(v),
            _ => None,
        })
    }

    /// The input embedding table `[vocab, hidden]` (what prompt tuning's `TEXT` and
    /// `SAMPLE_VOCAB` initialisations copy rows of).
    fn input_embeddings(&self) -> Option<burn::tensor::Tensor<2>> {
        None
    }

    /// The embedding tables (not sites: nothing attaches to them) by Hugging Face path
    /// (`model.embed_tokens`), for methods that train them whole.
    fn embeddings(&self) -> Vec<(String, &burn::module::Param<burn::tensor::Tensor<2>>)> {
        Vec::new()
    }

    /// [`SiteHost::embeddings`], mutable.
    fn embeddings_mut(
        &mut self,
    ) -> Vec<(String, &mut burn::module::Param<burn::tensor::Tensor<2>>)> {
        Vec::new()
    }

    /// The linear sites as target candidates, with the kind `target_modules` matching needs.
    fn module_paths(&self) -> Vec<(String, ModuleKind)> {
        self.sites()
            .into_iter()
            .filter_map(|(p, s)| match s {
                Site::Linear(_) => Some((p, ModuleKind::Linear)),
                Site::Head(_) => Some((p, ModuleKind::OutputHead)),
                _ => None,
            })
            .collect()
    }

    /// The paths of the sites of `kind`.
    fn site_paths(&self, kind: SiteKind) -> Vec<String> {
        self.sites()
            .into_iter()
            .filter(|(_, s)| s.kind() == kind)
            .map(|(p, _)| p)
            .collect()
    }
}

/// Take every merged part and norm copy of the model back out of its base.
pub fn unmerge_all<M: SiteHost>(mut model: M) -> Result<M> {
    for (_, site) in model.sites_mut() {
        match site {
            SiteMut::Linear(s) | SiteMut::Head(s) => {
                for name in s.merged.clone() {
                    s.unmerge(&name)?;
                }
            }
            SiteMut::Norm(n) => {
                if let Some(name) = n.scale_shift_merged.clone() {
                    n.fold_scale_shift(&name, true)?;
                }
                if let Some(name) = n.merged.clone() {
                    n.unmerge(&name)?;
                }
            }
            SiteMut::Prompt(_) | SiteMut::Sublayer(_) => {}
        }
    }
    Ok(model)
}

/// Merge the active adapters of every method and drop all adapters: the model becomes a plain
/// one whose weights include the updates (frozen, trained biases included). Virtual tokens and
/// bottleneck adapters (non-linear modules) cannot be merged into weights: an active one is an
/// error, before anything changes.
pub fn merge_and_unload<M: SiteHost>(mut model: M) -> Result<M> {
    for (path, site) in model.prompt_sites() {
        if let Some(name) = &site.active {
            return Err(peft_core::PeftError::Other(format!(
                "adapter `{name}` puts virtual tokens at {path}: prompt and prefix adapters \
                 cannot be merged into the weights (use the adapter folder with the base model)"
            )));
        }
    }
    for (path, site) in model.sublayers() {
        if let Some(name) = site.active_fusion.as_ref().or(site.active.as_ref()) {
            return Err(peft_core::PeftError::Other(format!(
                "adapter `{name}` puts a bottleneck adapter at {path}: bottleneck adapters are \
                 networks and cannot be merged into the weights (use the adapter folder with \
                 the base model)"
            )));
        }
    }
    for (_, site) in model.sites_mut() {
        match site {
            SiteMut::Sublayer(b) => {
                b.adapters.clear();
                b.names.clear();
                b.fusions.clear();
                b.fusion_names.clear();
            }
            SiteMut::Prompt(p) => {
                p.encoders.clear();
                p.names.clear();
            }
            SiteMut::Linear(s) | SiteMut::Head(s) => {
                if !s.disabled {
                    for name in s.active.clone() {
                        s.merge(&name)?;
                    }
                }
                s.parts.clear();
                s.names.clear();
                s.active.clear();
                s.merged.clear();
                s.disabled = false;
                if let BaseLinear::Dense(l) = &mut s.base {
                    l.weight = frozen(l.weight.val().detach());
                }
                s.base.set_bias_trainable(false);
            }
            SiteMut::Norm(n) => {
                if let Some(name) = n.active.clone() {
                    n.merge(&name)?;
                }
                if let Some(name) = n.scale_shift_active.clone()
                    && n.scale_shift_merged.is_none()
                {
                    n.fold_scale_shift(&name, false)?;
                }
                n.copies.clear();
                n.names.clear();
                n.active = None;
                n.merged = None;
                n.scale_shifts.clear();
                n.scale_shift_names.clear();
                n.scale_shift_active = None;
                n.scale_shift_merged = None;
            }
        }
    }
    Ok(model)
}
