//! One module per command group.
pub mod quickstart;
pub mod sandbox;
pub mod tree;
