//! Helpers shared by the CLI's end-to-end tests (each test file is its own crate and uses
//! what it needs).
#![allow(dead_code)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The `arbor` binary under test.
pub fn arbor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_arbor"));
    c.env("ARBOR_LOG", "warn");
    c
}

/// Kills the child (by pid) and reclaims its sandboxes if a test fails midway.
pub struct Guard(pub Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = arbor().args(["sandbox", "gc"]).output();
    }
}

/// After a SIGKILLed `arbor` process: a sandbox it was creating (directory or cgroup made, state
/// file not yet written) is left by `gc` for a grace period, since it may belong to a live
/// supervisor. Waits that out from `killed_at`, collects, and asserts nothing is left, so no
/// later test (the sandbox suite checks the whole host for leftovers) finds it.
pub fn reclaim_after_kill(killed_at: Instant) {
    std::thread::sleep(Duration::from_secs(32).saturating_sub(killed_at.elapsed()));
    let gc = arbor().args(["sandbox", "gc"]).output().expect("gc");
    assert!(gc.status.success());
    assert_nothing_left();
}

/// `arbor sandbox gc --check` finds no sandbox process, mount, cgroup or state directory.
pub fn assert_nothing_left() {
    let check = arbor()
        .args(["sandbox", "gc", "--check"])
        .output()
        .expect("gc --check");
    assert!(
        check.status.success(),
        "sandboxes left behind: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Held from the moment an `arbor` process was SIGKILLed: if the test then fails before it
/// calls [`reclaim_after_kill`], the drop during the panic waits out `gc`'s grace period and
/// collects, so a failing test does not leave a half-created sandbox behind either.
pub struct ReclaimOnPanic(pub Instant);

impl Drop for ReclaimOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_secs(32).saturating_sub(self.0.elapsed()));
            let _ = arbor().args(["sandbox", "gc"]).output();
        }
    }
}
