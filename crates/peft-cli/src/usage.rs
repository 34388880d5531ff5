//! Usage errors: a mistake in how `peft` was called (an option out of range, a missing or
//! conflicting option). They exit with code 2, like clap's own; failures of the work itself
//! (a bad file, a full disk) exit with 1.

use std::fmt;

/// A usage error; its message names the option and what it accepts.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `usage!("--r {r}: must be at least 1")`: an `anyhow::Error` that exits with code 2.
#[macro_export]
macro_rules! usage {
    ($($t:tt)*) => { anyhow::Error::new($crate::usage::UsageError(format!($($t)*))) };
}

/// Whether `e` (or anything it wraps) is a usage error.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<UsageError>())
}

/// `value` of `option` must be at least `min`.
pub fn at_least(option: &str, value: Option<usize>, min: usize) -> anyhow::Result<()> {
    match value {
        Some(v) if v < min => Err(usage!("{option} {v}: must be at least {min}")),
        _ => Ok(()),
    }
}

/// `value` of `option` must be a finite number greater than 0.
pub fn positive(option: &str, value: Option<f64>) -> anyhow::Result<()> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(usage!(
            "{option} {v}: must be a finite number greater than 0"
        )),
        _ => Ok(()),
    }
}

/// `value` of `option` must be a finite number of at least 0.
pub fn non_negative(option: &str, value: Option<f64>) -> anyhow::Result<()> {
    match value {
        Some(v) if !(v.is_finite() && v >= 0.0) => Err(usage!(
            "{option} {v}: must be a finite number of at least 0"
        )),
        _ => Ok(()),
    }
}

/// `value` of `option` must be in [0, 1).
pub fn fraction(option: &str, value: Option<f64>) -> anyhow::Result<()> {
    match value {
        Some(v) if !(0.0..1.0).contains(&v) => Err(usage!("{option} {v}: must be in [0, 1)")),
        _ => Ok(()),
    }
}

/// `--max-len`: the `given` value must be at least 2 tokens (an input and a target) and no more
/// than the model's positions (`positions`, its `max_position_embeddings`); without one, the
/// `default` capped at the model's positions.
pub fn max_len(
    given: Option<usize>,
    default: usize,
    positions: usize,
    virtual_tokens: usize,
) -> anyhow::Result<usize> {
    // Virtual tokens (prompt methods) take positions ahead of every sequence.
    let room = positions.saturating_sub(virtual_tokens);
    let why = if virtual_tokens > 0 {
        format!(
            "the model's max_position_embeddings {positions} less {virtual_tokens} virtual tokens"
        )
    } else {
        "the model's max_position_embeddings".to_string()
    };
    if room < 2 {
        return Err(usage!(
            "num_virtual_tokens {virtual_tokens}: leaves no room for a sequence (max_position_embeddings {positions})"
        ));
    }
    match given {
        Some(v) if v < 2 || v > room => Err(usage!(
            "--max-len {v}: must be between 2 and {room} ({why})"
        )),
        Some(v) => Ok(v),
        None => Ok(default.min(room)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_option_and_are_usage_errors() {
        let e = positive("--lr", Some(f64::NAN)).unwrap_err();
        assert!(is_usage(&e) && e.to_string().starts_with("--lr NaN"), "{e}");
        assert!(positive("--lr", Some(f64::INFINITY)).is_err());
        assert!(positive("--alpha", Some(-1.0)).is_err());
        assert!(positive("--lr", Some(1e-4)).is_ok());
        assert!(fraction("--dropout", Some(1.0)).is_err());
        assert!(fraction("--dropout", Some(0.0)).is_ok());
        assert!(
            at_least("--r", Some(0), 1)
                .unwrap_err()
                .to_string()
                .contains("--r 0")
        );
        assert!(
            max_len(Some(513), 128, 512, 0)
                .unwrap_err()
                .to_string()
                .contains("512")
        );
        assert_eq!(max_len(None, 256, 64, 0).unwrap(), 64);
        assert_eq!(max_len(None, 256, 64, 20).unwrap(), 44);
        let e = max_len(Some(500), 128, 512, 20).unwrap_err().to_string();
        assert!(e.contains("492") && e.contains("20 virtual tokens"), "{e}");
        assert!(
            max_len(None, 128, 512, 511)
                .unwrap_err()
                .to_string()
                .contains("num_virtual_tokens 511")
        );
        assert_eq!(max_len(Some(32), 256, 64, 0).unwrap(), 32);
        assert!(!is_usage(&anyhow::anyhow!("disk full")));
        assert!(is_usage(&usage!("x").context("while training")));
    }
}
