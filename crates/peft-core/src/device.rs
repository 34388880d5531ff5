//! Picking the burn device at run time by name (`--device cpu|wgpu|cuda`).

use burn::backend::DispatchDevice;
use burn::tensor::{DType, Device, FloatDType};

use crate::{PeftError, Result};

/// The device called `name`: `cpu` (alias `flex`), `wgpu` or `cuda` (`cuda:N` for GPU N).
/// A backend that was not compiled in is an error that names the cargo feature to enable.
pub fn device_by_name(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        "wgpu" => wgpu(),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let index = n
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .map_err(|_| PeftError::Config(format!("device `{n}`: expected cuda or cuda:N")))?;
            cuda(index.unwrap_or(0))
        }
        other => Err(PeftError::Config(format!(
            "unknown device `{other}` (expected cpu, wgpu or cuda)"
        ))),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    Err(PeftError::Config(
        "this build has no wgpu backend; rebuild with `--features wgpu`".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device> {
    Err(PeftError::Config(
        "this build has no CUDA backend; rebuild with `--features cuda`".into(),
    ))
}

/// Whether `device` (or the device an autodiff device wraps) is burn's CPU backend, where
/// fused host loops replace chains of tensor operations.
pub fn is_cpu(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// `device` computing in `dtype` (`f32`, `f16` or `bf16`): the default float type of every
/// tensor made on it from now on. Call it before anything is made on the device (the type is
/// set once per device and process); `f32` leaves the device as it is.
pub fn with_compute_dtype(mut device: Device, dtype: &str) -> Result<Device> {
    let float = match dtype {
        "f32" => return Ok(device),
        "f16" => FloatDType::F16,
        "bf16" => FloatDType::BF16,
        other => {
            return Err(PeftError::Config(format!(
                "unknown compute dtype `{other}` (expected f32, f16 or bf16)"
            )));
        }
    };
    if !device.supports_dtype(DType::from(float)) {
        return Err(PeftError::Config(format!(
            "the {device:?} device cannot compute in {dtype}"
        )));
    }
    device.configure(float).map_err(|e| {
        PeftError::Config(format!(
            "cannot make {dtype} the compute dtype of {device:?}: {e:?}"
        ))
    })?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::device_by_name("cpu").is_ok());
        assert!(super::is_cpu(&burn::tensor::Device::flex().autodiff()));
        let err = super::device_by_name("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        let err = super::with_compute_dtype(burn::tensor::Device::flex(), "f8")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`f8`") && err.contains("bf16"), "{err}");
    }
}
