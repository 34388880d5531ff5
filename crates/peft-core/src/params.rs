//! Parameter counts and freezing.
//!
//! Frozen parameters have `require_grad == false`, so autodiff neither computes nor stores
//! their gradients and optimizers keep no state for them. Counting which parameters are
//! trainable needs the model on an autodiff device (`device.autodiff()`): on a plain device
//! no tensor tracks gradients.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// Trainable and total parameter counts, printed the way Hugging Face PEFT prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamReport {
    pub trainable: usize,
    pub all: usize,
}

impl ParamReport {
    /// Count the parameters of `module` (trainable = those that require gradients).
    pub fn of<M: Module>(module: &M) -> Self {
        let mut counter = Counter::default();
        module.visit(&mut counter);
        counter.0
    }

    pub fn trainable_percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }
}

impl std::fmt::Display for ParamReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            self.trainable,
            self.all,
            self.trainable_percent()
        )
    }
}

#[derive(Default)]
struct Counter(ParamReport);

impl ModuleVisitor for Counter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.shape().num_elements();
        self.0.all += n;
        if param.val().is_require_grad() {
            self.0.trainable += n;
        }
    }
}

/// A frozen parameter: its value never receives a gradient.
pub fn frozen<const D: usize>(tensor: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(tensor).set_require_grad(false)
}

/// A trainable parameter.
pub fn trainable<const D: usize>(tensor: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(tensor)
}

/// Freeze every parameter of `model`: each becomes a new frozen parameter holding its value,
/// detached from any graph it was part of (e.g. a module trained before and now kept fixed).
pub fn freeze_all<M: Module>(model: M) -> M {
    struct Freeze;
    impl ModuleMapper for Freeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            frozen(param.val().detach())
        }
    }
    model.map(&mut Freeze)
}

/// Make every parameter of `model` trainable (full fine-tuning).
pub fn unfreeze_all<M: Module>(model: M) -> M {
    struct Unfreeze;
    impl ModuleMapper for Unfreeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.set_require_grad(true)
        }
    }
    model.map(&mut Unfreeze)
}
