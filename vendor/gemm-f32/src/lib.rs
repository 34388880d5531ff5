#![cfg_attr(not(feature = "std"), no_std)]

pub mod gemm;
pub mod isa;
#[macro_use]
mod kernel;
pub mod microkernel;

#[macro_use]
extern crate gemm_common;
