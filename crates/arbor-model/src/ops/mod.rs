//! Custom candle ops with CPU forward and backward passes.

pub mod fused;
mod simd;
pub mod tree_attention;

pub use fused::{RopeTables, rms_norm, rope, swiglu, token_logprobs};
pub use tree_attention::{TreeMask, tree_attention, tree_attention_reference};
