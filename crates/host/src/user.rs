//! An image's `User` in numbers, as runc resolves it: a name is looked up
//! in the image's own `/etc/passwd` (its uid and primary gid) and
//! `/etc/group` (a group name, and the groups that list the user as a
//! member). `parma policy gen` and `parma run` resolve it the same way, so
//! the policy pins the numbers the container then runs with; the files come
//! from the layers the policy pins by root hash.

use std::path::Path;

use anyhow::{Context, bail};

/// A user and its groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedUser {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary gids (groups listing the user by name), sorted.
    pub groups: Vec<u32>,
}

/// Whether `user` (`uid[:gid]` or names) needs the image's files.
pub fn needs_files(user: &str) -> bool {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    (!u.is_empty() && u.parse::<u32>().is_err()) || (!g.is_empty() && g.parse::<u32>().is_err())
}

/// Resolve the image's `User` (`""`, `uid`, `uid:gid`, `name`,
/// `name:group`, ...). Numbers are taken as they are: a numeric user
/// without a group runs with gid 0 and no supplementary groups. Names read
/// the image's files (only then).
pub fn image_user(oci: &Path, reference: Option<&str>, user: &str) -> anyhow::Result<ResolvedUser> {
    if !needs_files(user) {
        return resolve(user, "", "");
    }
    let files = parma_layer::read_files(oci, reference, &["/etc/passwd", "/etc/group"])
        .with_context(|| format!("cannot read the image's /etc/passwd for user {user:?}"))?;
    let text = |path: &str| files.get(path).map(|data| String::from_utf8_lossy(data).into_owned()).unwrap_or_default();
    resolve(user, &text("/etc/passwd"), &text("/etc/group"))
}

/// [`image_user`] over the files' text (empty when the image has none).
pub fn resolve(user: &str, passwd: &str, group: &str) -> anyhow::Result<ResolvedUser> {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let (uid, gid, name) = if u.is_empty() {
        (0, 0, None)
    } else if let Ok(uid) = u.parse::<u32>() {
        (uid, 0, None)
    } else {
        let entry = records(passwd)
            .find(|fields| fields.first() == Some(&u))
            .with_context(|| format!("user {u:?} is not in the image's /etc/passwd"))?;
        let number = |index: usize, what: &str| -> anyhow::Result<u32> {
            let text = entry.get(index).copied().unwrap_or_default();
            text.parse().with_context(|| format!("the {what} of {u:?} in /etc/passwd is {text:?}"))
        };
        (number(2, "uid")?, number(3, "gid")?, Some(u))
    };
    let gid = if g.is_empty() {
        gid
    } else if let Ok(gid) = g.parse::<u32>() {
        gid
    } else {
        let entry = records(group)
            .find(|fields| fields.first() == Some(&g))
            .with_context(|| format!("group {g:?} is not in the image's /etc/group"))?;
        let text = entry.get(2).copied().unwrap_or_default();
        text.parse().with_context(|| format!("the gid of group {g:?} in /etc/group is {text:?}"))?
    };
    let mut groups: Vec<u32> = match name {
        None => Vec::new(),
        Some(name) => records(group)
            .filter(|fields| fields.get(3).is_some_and(|members| members.split(',').any(|m| m == name)))
            .filter_map(|fields| fields.get(2).and_then(|gid| gid.parse().ok()))
            .filter(|&member_of| member_of != gid)
            .collect(),
    };
    groups.sort_unstable();
    groups.dedup();
    if groups.len() > 64 {
        bail!("user {user:?} is in {} groups; at most 64 are supported", groups.len());
    }
    Ok(ResolvedUser { uid, gid, groups })
}

/// The `:`-separated records of a passwd or group file, comments and blank lines skipped.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# a comment\nnginx:x:101:102:nginx:/var/cache/nginx:/sbin/nologin\nbad:x:nope:1::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnginx:x:102:\nwww:x:33:nginx,alice\nlogs:x:4:alice,nginx\nself:x:102:nginx\n";

    #[test]
    fn numbers_need_no_files() {
        assert!(!needs_files("") && !needs_files("1000") && !needs_files("1000:1001"));
        assert!(needs_files("nginx") && needs_files("1000:www") && needs_files("nginx:0"));
        assert_eq!(resolve("", "", "").unwrap(), ResolvedUser::default());
        assert_eq!(resolve("1000", "", "").unwrap(), ResolvedUser { uid: 1000, gid: 0, groups: vec![] });
        assert_eq!(resolve("1000:1001", "", "").unwrap(), ResolvedUser { uid: 1000, gid: 1001, groups: vec![] });
    }

    #[test]
    fn names_are_looked_up_as_runc_does() {
        // uid and primary gid from passwd; supplementary groups list it by
        // name, without the primary one.
        assert_eq!(resolve("nginx", PASSWD, GROUP).unwrap(), ResolvedUser { uid: 101, gid: 102, groups: vec![4, 33] });
        assert_eq!(
            resolve("nginx:www", PASSWD, GROUP).unwrap(),
            ResolvedUser { uid: 101, gid: 33, groups: vec![4, 102] }
        );
        assert_eq!(resolve("nginx:7", PASSWD, GROUP).unwrap().gid, 7);
        assert_eq!(resolve("5:www", PASSWD, GROUP).unwrap(), ResolvedUser { uid: 5, gid: 33, groups: vec![] });
    }

    #[test]
    fn unknown_names_and_bad_records_are_errors() {
        let err = |user: &str| format!("{:#}", resolve(user, PASSWD, GROUP).unwrap_err());
        assert!(err("ghost").contains("\"ghost\" is not in the image's /etc/passwd"));
        assert!(err("nginx:ghosts").contains("\"ghosts\" is not in the image's /etc/group"));
        assert!(err("bad").contains("uid of \"bad\""));
        assert!(resolve("nginx", "", "").is_err(), "an image without /etc/passwd has no names");
    }
}
