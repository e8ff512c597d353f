//! Policies that are not real models.
pub mod scripted;
pub mod shell_tool;
