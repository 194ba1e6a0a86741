//! Sluice's benchmark library: the pieces of `bench` that tests use too.
//!
//! - [`sim`]: the simulated vLLM (`bench sim`, `bench calibrate`).

pub mod sim;
