//! One module per command group.
pub mod image;
pub mod image_bench;
pub mod node;
pub mod node_bench;
pub mod pipeline;
pub mod policy;
pub mod quickstart;
pub mod report;
pub mod rlcheck;
pub mod run;
pub mod sandbox;
pub mod serve;
pub mod task;
pub mod train;
pub mod tree;
