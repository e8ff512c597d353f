//! The user commands run as: Docker's `USER` syntax resolved against the
//! sandbox's own `/etc/passwd` and `/etc/group` (read by init after it built
//! the root, so they are the image's files, not the host's).
//!
//! Rules follow Docker's: a name must exist in passwd; a numeric uid need
//! not (its gid is then 0 and its home `/`); the primary group is the
//! passwd entry's unless `:group` names one; supplementary groups are the
//! groups whose member list names the user.

use std::fs;
use std::path::Path;

/// Who a command runs as, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary gid included).
    pub groups: Vec<u32>,
    /// Home directory from passwd (`/` without an entry).
    pub home: String,
}

/// One line of `/etc/passwd`.
struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Passwd<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && !line.starts_with('#')).then_some(())?;
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// `(name, gid, members)` of each line of `/etc/group`.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && !line.starts_with('#')).then_some(())?;
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolve `spec` (`user[:group]`) against the contents of passwd and group.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|p| p.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|p| p.name == user)
                .ok_or_else(|| format!("user '{user}' not found in the sandbox's /etc/passwd"))?,
        ),
    };
    let uid = match &entry {
        Some(p) => p.uid,
        None => user.parse().unwrap_or_default(),
    };
    let gid = match grp {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| format!("group '{g}' not found in the sandbox's /etc/group"))?,
        },
        None => entry.as_ref().map_or(0, |p| p.gid),
    };
    let mut groups = vec![gid];
    if let Some(p) = &entry {
        for (_, g, members) in group_entries(group) {
            if members.contains(&p.name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    let home = entry.as_ref().map_or("/", |p| p.home).to_string();
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

/// Resolve `spec` against the files under `/` of the current root. A missing
/// file reads as empty (a minimal image may have none; numeric ids still work).
pub fn resolve(spec: &str) -> Result<Identity, String> {
    let read = |p: &str| match fs::read_to_string(Path::new(p)) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("read the sandbox's {p}: {e}")),
    };
    resolve_in(spec, &read("/etc/passwd")?, &read("/etc/group")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\ndocker:x:999:other\n";

    #[test]
    fn name_takes_passwd_gid_home_and_member_groups() {
        let id = resolve_in("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 50],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn unknown_name_is_a_clear_error() {
        let e = resolve_in("nosuch", PASSWD, GROUP).unwrap_err();
        assert_eq!(e, "user 'nosuch' not found in the sandbox's /etc/passwd");
        let e = resolve_in("app:nogroup", PASSWD, GROUP).unwrap_err();
        assert!(e.contains("group 'nogroup' not found"), "{e}");
    }

    #[test]
    fn numeric_ids_need_no_entry() {
        let id = resolve_in("1234", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (1234, 0, "/"));
        let id = resolve_in("1234:1234", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.groups), (1234, 1234, vec![1234]));
        let id = resolve_in("1000", PASSWD, GROUP).unwrap();
        assert_eq!((id.gid, id.home.as_str()), (1000, "/home/app"));
    }

    #[test]
    fn group_by_name_or_number() {
        let id = resolve_in("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.groups), (1000, 50, vec![50]));
        let id = resolve_in("nobody:7", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (65534, 7));
    }
}
