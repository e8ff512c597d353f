//! Sandboxes whose root is a stack of overlay layer directories (as image
//! layers are), the user commands run as, the host-network mode, and
//! capturing a sandbox's writable layer with `copy_layer`.
//!
//! The layers hold a real minimal userland: Debian's static busybox with its
//! applet links and a tiny `/etc/passwd` and `/etc/group`. Without
//! busybox-static installed the layer tests are skipped with a message,
//! except in CI (`CI` set), where they fail. Needs root, like `isolation`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbor_sandbox::local::{LocalBackend, LocalConfig, LocalSandbox};
use arbor_sandbox::{ExecRequest, ExecResult, Sandbox, SandboxError, SandboxSpec, copy_layer};
use libtest_mimic::{Arguments, Failed, Trial};

type TestResult = Result<(), Failed>;
type TestFn = fn() -> TestResult;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failed::from(format!($($msg)+)));
        }
    };
}

fn backend() -> Result<LocalBackend, Failed> {
    LocalBackend::new(LocalConfig {
        init_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_arbor-sandbox-init"))),
        ..Default::default()
    })
    .map_err(|e| Failed::from(format!("local backend unavailable (needs root): {e}")))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Sandboxes destroyed whatever the test body returns.
struct Sandboxes(Vec<LocalSandbox>);

impl Sandboxes {
    async fn create(
        &mut self,
        b: &LocalBackend,
        spec: &SandboxSpec,
    ) -> Result<LocalSandbox, Failed> {
        let sb = b
            .create_local(spec)
            .await
            .map_err(|e| format!("create: {e}"))?;
        self.0.push(sb.clone());
        Ok(sb)
    }

    async fn fork(&mut self, of: &LocalSandbox) -> Result<LocalSandbox, Failed> {
        let sb = of.fork_local().await.map_err(|e| format!("fork: {e}"))?;
        self.0.push(sb.clone());
        Ok(sb)
    }

    async fn destroy_all(&mut self) -> TestResult {
        for sb in self.0.drain(..) {
            sb.destroy().await.map_err(|e| format!("destroy: {e}"))?;
        }
        Ok(())
    }
}

/// Run `body` with a backend and a sandbox list destroyed afterwards.
fn with_sandboxes<F>(body: F) -> TestResult
where
    F: AsyncFnOnce(&LocalBackend, &mut Sandboxes) -> TestResult,
{
    rt().block_on(async {
        let b = backend()?;
        let mut sbs = Sandboxes(Vec::new());
        let res = body(&b, &mut sbs).await;
        let destroyed = sbs.destroy_all().await;
        res.and(destroyed)
    })
}

async fn sh(sb: &LocalSandbox, script: &str) -> Result<ExecResult, Failed> {
    sb.exec(ExecRequest::shell(script).timeout(Duration::from_secs(30)))
        .await
        .map_err(|e| Failed::from(format!("exec {script:?}: {e}")))
}

/// Run `script`, requiring success; its stdout.
async fn ok(sb: &LocalSandbox, script: &str) -> Result<String, Failed> {
    let r = sh(sb, script).await?;
    ensure!(
        r.success(),
        "{script:?} failed ({}): {}{}",
        r.exit_code,
        r.stdout_str(),
        r.stderr_str()
    );
    Ok(r.stdout_str())
}

// --- building layers --------------------------------------------------------

/// Where Debian's busybox-static puts busybox, if it is installed (a
/// dynamically linked busybox cannot run in a layer without libc).
fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| std::fs::read(p).is_ok_and(|elf| is_static_elf(&elf)))
}

/// An ELF64 executable without a `PT_INTERP` program header (no dynamic loader).
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff as usize + i * phentsize) != Some(3))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// An overlay whiteout: a 0:0 character device hiding `path` in lower layers.
fn whiteout(path: &Path) -> TestResult {
    // SAFETY: valid NUL-terminated path; mknod only creates a node.
    let r = unsafe { libc::mknod(cpath(path).as_ptr(), libc::S_IFCHR, 0) };
    ensure!(
        r == 0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> TestResult {
    let n = CString::new(name).expect("name");
    // SAFETY: valid path, name and value buffers.
    let r = unsafe {
        libc::lsetxattr(
            cpath(path).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    ensure!(
        r == 0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let n = CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid path, name and buffer.
    let len = unsafe {
        libc::lgetxattr(
            cpath(path).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

fn write(root: &Path, rel: &str, data: &str) -> TestResult {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().ok_or("no parent")?)?;
    std::fs::write(p, data)?;
    Ok(())
}

/// Layers of a small image, uppermost first in `dirs`:
/// - base: busybox userland, users root/app(1000)/nobody, group devs(2000)
///   with member app, a root-owned 0755 `/data`, files `lower.txt`,
///   `gone.txt`, `shadowed.txt` ("base"), `opq/old.txt`, `ldir/a`;
/// - top: a whiteout of `gone.txt`, `opq` opaque with `opq/new.txt`,
///   `shadowed.txt` ("top"), `top.txt`.
struct Image {
    _tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
}

fn build_base(base: &Path, busybox: &Path) -> TestResult {
    let bin = base.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    let list = std::process::Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
    }
    write(
        base,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    write(
        base,
        "etc/group",
        "root:x:0:\napp:x:1000:\ndevs:x:2000:app\nnogroup:x:65534:\n",
    )?;
    std::fs::create_dir_all(base.join("home/app"))?;
    std::os::unix::fs::chown(base.join("home/app"), Some(1000), Some(1000))?;
    std::fs::create_dir_all(base.join("root"))?;
    std::fs::create_dir_all(base.join("data"))?;
    for (f, c) in [
        ("lower.txt", "lower"),
        ("gone.txt", "gone"),
        ("shadowed.txt", "base"),
        ("opq/old.txt", "old"),
        ("ldir/a", "a"),
    ] {
        write(base, f, c)?;
    }
    Ok(())
}

fn image() -> Result<Image, Failed> {
    let busybox = static_busybox().ok_or("busybox-static is not installed")?;
    let tmp = tempfile::tempdir()?;
    let (top, base) = (tmp.path().join("top"), tmp.path().join("base"));
    build_base(&base, &busybox)?;
    std::fs::create_dir_all(top.join("opq"))?;
    whiteout(&top.join("gone.txt"))?;
    set_xattr(&top.join("opq"), "trusted.overlay.opaque", b"y")?;
    write(&top, "opq/new.txt", "new")?;
    write(&top, "shadowed.txt", "top")?;
    write(&top, "top.txt", "top")?;
    Ok(Image {
        _tmp: tmp,
        dirs: vec![top, base],
    })
}

fn layered(dirs: &[PathBuf]) -> SandboxSpec {
    SandboxSpec {
        layers: dirs.to_vec(),
        ..Default::default()
    }
}

/// Everything about a tree that a sandbox could change: per path, its type,
/// mode, owner, size, mtime, device number and file content.
fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, String>, Failed> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        let content = if m.is_file() {
            std::fs::read(&p)?
        } else {
            Vec::new()
        };
        let key = p.strip_prefix(root)?.to_path_buf();
        let desc = format!(
            "{:o} {}:{} {} {}.{} {} {:?}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.rdev(),
            content
        );
        out.insert(key, desc);
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(out)
}

// --- tests ------------------------------------------------------------------

fn layers_stack() -> TestResult {
    let img = image()?;
    let before: Vec<_> = img
        .dirs
        .iter()
        .map(|d| snapshot(d))
        .collect::<Result<_, _>>()?;
    let spec = layered(&img.dirs);
    with_sandboxes(async |b, sbs| {
        let sb = sbs.create(b, &spec).await?;
        let out = ok(
            &sb,
            "cat /lower.txt; echo; test -e /gone.txt || echo gone-hidden; ls /opq; \
             cat /shadowed.txt; echo; cat /top.txt",
        )
        .await?;
        ensure!(
            out == "lower\ngone-hidden\nnew.txt\ntop\ntop",
            "layered view: {out:?}"
        );
        // A second sandbox on the same layers at the same time.
        let other = sbs.create(b, &spec).await?;
        ok(
            &sb,
            "echo one > /lower.txt; echo x > /data/f; rm /top.txt; mkdir /made",
        )
        .await?;
        ok(&other, "echo two > /lower.txt").await?;
        let (a, o) = (
            ok(&sb, "cat /lower.txt").await?,
            ok(&other, "cat /lower.txt; cat /top.txt").await?,
        );
        ensure!(
            a == "one\n" && o == "two\ntop",
            "sandboxes not independent: {a:?} {o:?}"
        );
        let fork = sbs.fork(&sb).await?;
        let f = ok(&fork, "cat /lower.txt /data/f; test -e /top.txt || echo no-top; ls -d /made; cat /opq/new.txt").await?;
        ensure!(
            f == "one\nx\nno-top\n/made\nnew",
            "fork of a layered sandbox: {f:?}"
        );
        ok(&fork, "echo forked > /lower.txt").await?;
        ensure!(
            ok(&sb, "cat /lower.txt").await? == "one\n",
            "fork wrote into its parent"
        );
        Ok(())
    })?;
    for (dir, was) in img.dirs.iter().zip(before) {
        ensure!(snapshot(dir)? == was, "layer {} changed", dir.display());
    }
    Ok(())
}

fn many_long_layers() -> TestResult {
    let img = image()?;
    let tmp = tempfile::tempdir()?;
    let long = tmp.path().join("c".repeat(100)).join("d".repeat(100));
    // Colons and commas cannot be written in the classic option string.
    let mut dirs: Vec<PathBuf> = (0..60)
        .map(|i| long.join(format!("sha256:layer,{i:03}")))
        .collect();
    for (i, d) in dirs.iter().enumerate() {
        write(d, "which", &i.to_string())?;
        write(d, &format!("f{i}"), "")?;
    }
    let option_len: usize = dirs.iter().map(|d| d.as_os_str().len() + 1).sum();
    ensure!(option_len > 4096, "lowerdir list only {option_len} bytes");
    dirs.extend(img.dirs.iter().cloned());
    with_sandboxes(async |b, sbs| {
        let sb = sbs.create(b, &layered(&dirs)).await?;
        let out = ok(&sb, "cat /which; echo; ls / | grep -c '^f'").await?;
        ensure!(out == "0\n60\n", "top layer must win, all visible: {out:?}");
        Ok(())
    })
}

fn user_switch() -> TestResult {
    let img = image()?;
    let spec = SandboxSpec {
        user: Some("app".into()),
        ..layered(&img.dirs)
    };
    with_sandboxes(async |b, sbs| {
        let sb = sbs.create(b, &spec).await?;
        let out = ok(
            &sb,
            "id -u; id -G; echo $HOME; grep -E '^Cap(Eff|Prm|Inh)' /proc/self/status",
        )
        .await?;
        let lines: Vec<&str> = out.lines().collect();
        ensure!(lines.first() == Some(&"1000"), "uid: {out}");
        ensure!(
            lines
                .get(1)
                .is_some_and(|g| g.split(' ').any(|g| g == "2000")),
            "groups must include devs (2000): {out}"
        );
        ensure!(lines.get(2) == Some(&"/home/app"), "HOME: {out}");
        for cap in &lines[3..] {
            ensure!(
                cap.ends_with("0000000000000000"),
                "a non-root user holds capabilities: {out}"
            );
        }
        let r = sh(&sb, "touch /data/nope").await?;
        ensure!(
            !r.success() && r.stderr_str().contains("Permission denied"),
            "write to root's 0755 dir: {} {}",
            r.exit_code,
            r.stderr_str()
        );
        // File operations stay root.
        sb.write_file("/data/by-root", b"r", 0o644)
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            ok(&sb, "cat /data/by-root").await? == "r",
            "file op as root"
        );
        let id = sbs
            .create(
                b,
                &SandboxSpec {
                    user: Some("1234:1234".into()),
                    ..layered(&img.dirs)
                },
            )
            .await?;
        let out = ok(&id, "id -u; id -g; echo $HOME").await?;
        ensure!(out == "1234\n1234\n/\n", "numeric user: {out:?}");
        match b
            .create_local(&SandboxSpec {
                user: Some("nosuch".into()),
                ..layered(&img.dirs)
            })
            .await
        {
            Err(SandboxError::Setup(m))
                if m.contains("user 'nosuch' not found in the sandbox's /etc/passwd") =>
            {
                Ok(())
            }
            Err(e) => Err(format!("unknown user: wrong error {e}").into()),
            Ok(sb) => {
                let _ = sb.destroy().await;
                Err("unknown user accepted".into())
            }
        }
    })
}

/// Interface names in a `/proc/net/dev` listing.
fn interfaces(dev: &str) -> Vec<String> {
    let mut names: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split(':').next()?.trim().to_string()))
        .collect();
    names.sort();
    names
}

fn host_network() -> TestResult {
    let host_ns = std::fs::read_link("/proc/self/ns/net")?
        .display()
        .to_string();
    let host_ifs = interfaces(&std::fs::read_to_string("/proc/net/dev")?);
    with_sandboxes(async |b, sbs| {
        let script = "readlink /proc/self/ns/net; echo ==; cat /proc/net/dev";
        for host in [false, true] {
            let mut spec = SandboxSpec::default();
            spec.network.host = host;
            let out = ok(&sbs.create(b, &spec).await?, script).await?;
            let (ns, dev) = out.split_once("==\n").ok_or("no separator")?;
            let ifs = interfaces(dev);
            if host {
                ensure!(
                    ns.trim() == host_ns,
                    "host network: namespace {ns} != {host_ns}"
                );
                ensure!(ifs == host_ifs, "host network: {ifs:?} != {host_ifs:?}");
            } else {
                ensure!(ns.trim() != host_ns, "default network is the host's");
                ensure!(ifs == ["lo"], "default network: {ifs:?}");
            }
        }
        Ok(())
    })
}

fn writable_layer_captured() -> TestResult {
    let img = image()?;
    let out = tempfile::tempdir()?;
    let captured = out.path().join("layer");
    with_sandboxes(async |b, sbs| {
        let sb = sbs.create(b, &layered(&img.dirs)).await?;
        ok(
            &sb,
            "echo hello > /workspace/out.txt; rm /lower.txt; rm -r /ldir; mkdir /ldir; \
             echo n > /ldir/new; echo hl > /hl1; ln /hl1 /hl2",
        )
        .await?;
        let upper = sb.writable_layer();
        let seen = std::fs::read_to_string(upper.join("workspace/out.txt"))?;
        ensure!(seen == "hello\n", "writable layer shows {seen:?}");
        copy_layer(&upper, &captured)?;
        Ok(())
    })?;
    let wo = std::fs::symlink_metadata(captured.join("lower.txt"))?;
    ensure!(
        wo.file_type().is_char_device() && wo.rdev() == 0,
        "whiteout not kept"
    );
    ensure!(
        get_xattr(&captured.join("ldir"), "trusted.overlay.opaque").as_deref() == Some(b"y"),
        "opaque dir not kept"
    );
    let (h1, h2) = (
        std::fs::metadata(captured.join("hl1"))?,
        std::fs::metadata(captured.join("hl2"))?,
    );
    ensure!(
        h1.ino() == h2.ino() && h1.nlink() == 2,
        "hard link pair split"
    );
    // The captured layer, stacked on the image, reproduces the sandbox's view.
    let mut dirs = vec![captured.clone()];
    dirs.extend(img.dirs.iter().cloned());
    with_sandboxes(async |b, sbs| {
        let sb = sbs.create(b, &layered(&dirs)).await?;
        let view = ok(
            &sb,
            "cat /workspace/out.txt; test -e /lower.txt || echo deleted; ls /ldir; cat /hl2",
        )
        .await?;
        ensure!(
            view == "hello\ndeleted\nnew\nhl\n",
            "captured layer view: {view:?}"
        );
        Ok(())
    })
}

/// `copy_layer` keeps a file capability (set after the owner, which clears it).
fn copy_layer_keeps_file_caps() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    write(&src, "bin/ping", "elf")?;
    std::os::unix::fs::chown(src.join("bin/ping"), Some(0), Some(0))?;
    // vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW (13).
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    set_xattr(&src.join("bin/ping"), "security.capability", &cap)?;
    set_xattr(&src.join("bin/ping"), "user.note", b"kept")?;
    let dst = tmp.path().join("dst");
    copy_layer(&src, &dst)?;
    let ping = dst.join("bin/ping");
    ensure!(
        get_xattr(&ping, "security.capability") == Some(cap),
        "file capability lost"
    );
    ensure!(
        get_xattr(&ping, "user.note").as_deref() == Some(b"kept"),
        "user xattr lost"
    );
    ensure!(std::fs::read(&ping)? == b"elf", "content");
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let skip = static_busybox().is_none() && std::env::var_os("CI").is_none();
    if skip {
        eprintln!(
            "skipping the layer tests: busybox-static is not installed \
             (apt-get install busybox-static); in CI they run and fail without it"
        );
    }
    let layer_tests: [(&str, TestFn); 4] = [
        ("layers_stack", layers_stack),
        ("many_long_layers", many_long_layers),
        ("user_switch", user_switch),
        ("writable_layer_captured", writable_layer_captured),
    ];
    let mut tests: Vec<Trial> = layer_tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f).with_ignored_flag(skip))
        .collect();
    tests.push(Trial::test("host_network", host_network));
    tests.push(Trial::test(
        "copy_layer_keeps_file_caps",
        copy_layer_keeps_file_caps,
    ));
    libtest_mimic::run(&args, tests).exit();
}
