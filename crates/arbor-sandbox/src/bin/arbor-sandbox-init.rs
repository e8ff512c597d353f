//! The init program of arbor sandboxes (PID 1 inside each one). Started by
//! the supervisor, never by hand; see `arbor_sandbox::init`.

fn main() {
    arbor_sandbox::init::run()
}
