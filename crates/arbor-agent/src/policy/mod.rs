//! Policies that are not real models.
pub mod scripted;
