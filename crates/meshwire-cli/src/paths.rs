//! Where agents keep their files, and checks that turn a wrong path into a
//! sentence: a folder given as a file says so, a missing parent folder is
//! an error unless the command creates files.

use crate::agent::CliResult;
use std::path::{Path, PathBuf};

/// What a path is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRole {
    /// A file that must exist.
    ExistingFile,
    /// A file to create; its folder must exist.
    NewFile,
    /// A file to create, with any missing parent folders (mode 0700).
    NewFileCreateParents,
    /// A folder, created if missing when its parent exists.
    Dir,
    /// A folder, created with its parents if missing (mode 0700).
    DirCreate,
}

/// The folder of an agent's default files:
/// `<data dir>/meshwire/<name or "default">`.
pub fn agent_dir(name: Option<&str>) -> CliResult<PathBuf> {
    let base = dirs::data_dir().ok_or(
        "no data directory is known for this user (HOME unset?): pass --identity and --state, \
         or set MESHWIRE_IDENTITY and MESHWIRE_STATE",
    )?;
    let leaf: String = match name {
        Some(name) if !name.is_empty() => name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect(),
        _ => "default".into(),
    };
    let leaf = if leaf.starts_with('.') {
        format!("_{leaf}")
    } else {
        leaf
    };
    Ok(base.join("meshwire").join(leaf))
}

fn create_dirs(dir: &Path, what: &str, parents: bool) -> CliResult<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(parents);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    match builder.create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(format!("{what}: cannot create folder {}: {e}", dir.display())),
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Checks `path` for `role` (creating folders where the role says so);
/// `what` names it in the error ("identity file").
pub fn check(path: &Path, role: PathRole, what: &str) -> CliResult<()> {
    let shown = path.display();
    match role {
        PathRole::ExistingFile | PathRole::NewFile | PathRole::NewFileCreateParents => {
            if path.is_dir() {
                return Err(format!(
                    "{what} {shown} is a folder, not a file; give the path of a file"
                ));
            }
        }
        PathRole::Dir | PathRole::DirCreate => {
            if path.exists() && !path.is_dir() {
                return Err(format!("{what} {shown} is a file, not a folder"));
            }
        }
    }
    let parent = parent_of(path);
    match role {
        PathRole::ExistingFile => {
            if !path.exists() {
                return Err(format!("{what} {shown} does not exist"));
            }
        }
        PathRole::NewFile | PathRole::Dir => {
            if !parent.is_dir() {
                return Err(if parent.exists() {
                    format!("{what} {shown}: {} is not a folder", parent.display())
                } else {
                    format!(
                        "{what} {shown}: the folder {} does not exist (create it first)",
                        parent.display()
                    )
                });
            }
            if role == PathRole::Dir && !path.exists() {
                create_dirs(path, what, false)?;
            }
        }
        PathRole::NewFileCreateParents => create_dirs(&parent, what, true)?,
        PathRole::DirCreate => create_dirs(path, what, true)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of a check that must fail.
    fn refused(path: &Path, role: PathRole, what: &str) -> String {
        match check(path, role, what) {
            Err(e) => e,
            Ok(()) => unreachable!("{} passed as {role:?}", path.display()),
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshwire-paths-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| unreachable!("{e}"));
        dir
    }

    #[test]
    fn wrong_paths_say_what_is_wrong() {
        let dir = temp("wrong");
        let err = refused(&dir, PathRole::ExistingFile, "identity file");
        assert!(err.contains("is a folder, not a file"), "{err}");
        let missing = dir.join("nope").join("id.json");
        let err = refused(&missing, PathRole::NewFile, "identity file");
        assert!(err.contains("does not exist (create it first)"), "{err}");
        assert!(!dir.join("nope").exists());
        check(&missing, PathRole::NewFileCreateParents, "identity file").unwrap_or_else(|e| unreachable!("{e}"));
        assert!(dir.join("nope").is_dir());
        let err = refused(
            &dir.join("nope").join("id.json"),
            PathRole::ExistingFile,
            "identity file",
        );
        assert!(err.contains("does not exist"), "{err}");
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap_or_else(|e| unreachable!("{e}"));
        let err = refused(&file, PathRole::Dir, "state folder");
        assert!(err.contains("is a file, not a folder"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn agent_dirs_are_per_name() {
        let a = agent_dir(Some("alice")).unwrap_or_else(|e| unreachable!("{e}"));
        let b = agent_dir(Some("../bob")).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(a.ends_with("meshwire/alice"), "{}", a.display());
        assert!(b.ends_with("meshwire/_.._bob"), "{}", b.display());
        assert!(agent_dir(None)
            .unwrap_or_else(|e| unreachable!("{e}"))
            .ends_with("meshwire/default"));
    }
}
