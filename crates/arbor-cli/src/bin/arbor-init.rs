//! The init program of arbor's sandboxes (PID 1 inside each), installed next
//! to `arbor`. Built from the same package, so it always speaks the same
//! protocol as the `arbor` beside it; it is much smaller than `arbor`, which
//! keeps the per-sandbox memory floor low.

fn main() {
    arbor_sandbox::init::run()
}
