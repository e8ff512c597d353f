//! The seccomp filter every sandboxed process runs under.
//!
//! A deny-list on top of the other layers (namespaces, dropped capabilities,
//! `no_new_privs`): it refuses the system calls that reshape the sandbox
//! (mount, pivot_root, new namespaces), reach the kernel as a whole (modules,
//! kexec, bpf, keyrings, clocks, swap, reboot) or are common escape primitives
//! (open_by_handle_at, userfaultfd, TIOCSTI). Refused calls fail with EPERM,
//! which programs handle, rather than killing the process.

// Syscall numbers and ioctl request types differ between architectures;
// the casts are no-ops only on some of them.
#![allow(clippy::unnecessary_cast)]

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Namespace flags that `clone` may not carry.
const NAMESPACE_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// System calls refused outright.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_perf_event_open,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_quotactl,
    libc::SYS_userfaultfd,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_lookup_dcookie,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

/// The compiled filters, built once per init and applied in each child.
pub struct Filters {
    /// EPERM for the deny-list and namespace-creating clones.
    deny: BpfProgram,
    /// ENOSYS for clone3, whose flags live in memory a filter cannot read;
    /// libc then falls back to clone, which the deny filter does check.
    no_clone3: BpfProgram,
}

impl Filters {
    /// Compile the filters for the running architecture.
    pub fn build() -> Result<Self, String> {
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for &nr in DENIED {
            rules.insert(nr as i64, Vec::new());
        }
        let mut clone_rules = Vec::new();
        for flag in NAMESPACE_FLAGS {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| e.to_string())?;
            clone_rules.push(SeccompRule::new(vec![cond]).map_err(|e| e.to_string())?);
        }
        rules.insert(libc::SYS_clone as i64, clone_rules);
        // TIOCSTI pushes input into a terminal: a classic way out of a sandbox
        // that shares a tty.
        let tiocsti = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::TIOCSTI as u64,
        )
        .map_err(|e| e.to_string())?;
        rules.insert(
            libc::SYS_ioctl as i64,
            vec![SeccompRule::new(vec![tiocsti]).map_err(|e| e.to_string())?],
        );
        let deny = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        let mut clone3 = BTreeMap::new();
        clone3.insert(libc::SYS_clone3 as i64, Vec::new());
        let no_clone3 = SeccompFilter::new(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        Ok(Filters {
            deny: deny
                .try_into()
                .map_err(|e: seccompiler::BackendError| e.to_string())?,
            no_clone3: no_clone3
                .try_into()
                .map_err(|e: seccompiler::BackendError| e.to_string())?,
        })
    }

    /// Install both filters on the calling thread. Requires `no_new_privs`.
    pub fn apply(&self) -> Result<(), String> {
        seccompiler::apply_filter(&self.no_clone3).map_err(|e| e.to_string())?;
        seccompiler::apply_filter(&self.deny).map_err(|e| e.to_string())
    }
}
