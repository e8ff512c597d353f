//! Run reports (being written; see the report helper's brief).
