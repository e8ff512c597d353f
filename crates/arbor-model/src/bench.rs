//! Linear-vs-tree training benchmark (filled in below).
