//! `larder prepare-disk`: gives the disk tier's directory on the node to the proxy's user.
//!
//! hostPath volumes ignore `fsGroup`, so the chart runs this as root in an init container with
//! only the `CHOWN` capability. It must work on every start on a node, not only the first: once
//! the directory belongs to the proxy's user, root without `FOWNER` may no longer `chmod` it
//! (the busybox `chmod && chown` this replaces failed there, and the proxy never started again
//! on that node). So nothing is changed that is already right, and when the mode is wrong on a
//! directory root does not own, it is taken back first (`chown` is all `CHOWN` allows).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Flags of `larder prepare-disk`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareDiskArgs {
    /// The directory to prepare (created if missing).
    #[arg(long, env = "LARDER_PREPARE_DISK_PATH")]
    pub path: PathBuf,
    /// User that must own it.
    #[arg(long, env = "LARDER_PREPARE_DISK_UID", default_value_t = 65532)]
    pub uid: u32,
    /// Group that must own it.
    #[arg(long, env = "LARDER_PREPARE_DISK_GID", default_value_t = 65532)]
    pub gid: u32,
    /// Permission bits it must have (octal).
    #[arg(long, env = "LARDER_PREPARE_DISK_MODE", default_value = "700", value_parser = parse_mode)]
    pub mode: u32,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 700"))
}

/// Why the directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareDiskError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot {step} {path}: {source} (the init container needs the CHOWN capability)")]
    Change {
        step: Step,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One change to the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `chown uid:gid`.
    Chown { uid: u32, gid: u32 },
    /// `chmod mode`.
    Chmod { mode: u32 },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Chown { uid, gid } => write!(f, "chown {uid}:{gid}"),
            Self::Chmod { mode } => write!(f, "chmod {mode:o}"),
        }
    }
}

/// What the directory looks like and what it must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The changes that take `current` to `wanted`, in order, for a process that is root with
/// `CHOWN` only (no `FOWNER`): it may `chmod` only what it owns, so a directory with the wrong
/// mode that root does not own is first given to root.
pub fn steps(current: Ownership, wanted: Ownership) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut owner = (current.uid, current.gid);
    if current.mode & 0o7777 != wanted.mode {
        if owner.0 != 0 {
            steps.push(Step::Chown { uid: 0, gid: 0 });
            owner = (0, 0);
        }
        steps.push(Step::Chmod { mode: wanted.mode });
    }
    if owner != (wanted.uid, wanted.gid) {
        steps.push(Step::Chown {
            uid: wanted.uid,
            gid: wanted.gid,
        });
    }
    steps
}

fn ownership(path: &Path) -> Result<Ownership, PrepareDiskError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| PrepareDiskError::Stat {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(PrepareDiskError::NotADirectory {
            path: path.to_owned(),
        });
    }
    Ok(Ownership {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
    })
}

/// Prepares the directory; returns the steps it took (none when it was already right).
pub fn prepare(args: &PrepareDiskArgs) -> Result<Vec<Step>, PrepareDiskError> {
    let path = args.path.as_path();
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(|source| PrepareDiskError::Create {
            path: path.to_owned(),
            source,
        })?;
    }
    let wanted = Ownership {
        uid: args.uid,
        gid: args.gid,
        mode: args.mode,
    };
    let todo = steps(ownership(path)?, wanted);
    for step in &todo {
        let done = match *step {
            Step::Chown { uid, gid } => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            Step::Chmod { mode } => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            }
        };
        done.map_err(|source| PrepareDiskError::Change {
            step: *step,
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(todo)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: Ownership = Ownership {
        uid: 65532,
        gid: 65532,
        mode: 0o700,
    };

    #[test]
    fn a_fresh_root_directory_is_chmodded_then_given_away() {
        let current = Ownership {
            uid: 0,
            gid: 0,
            mode: 0o755,
        };
        assert_eq!(
            steps(current, WANTED),
            vec![
                Step::Chmod { mode: 0o700 },
                Step::Chown {
                    uid: 65532,
                    gid: 65532
                }
            ]
        );
    }

    #[test]
    fn a_prepared_directory_needs_nothing() {
        assert_eq!(steps(WANTED, WANTED), vec![]);
    }

    #[test]
    fn a_wrong_mode_on_a_directory_root_does_not_own_is_taken_back_first() {
        let current = Ownership {
            mode: 0o755,
            ..WANTED
        };
        assert_eq!(
            steps(current, WANTED),
            vec![
                Step::Chown { uid: 0, gid: 0 },
                Step::Chmod { mode: 0o700 },
                Step::Chown {
                    uid: 65532,
                    gid: 65532
                }
            ]
        );
    }

    #[test]
    fn only_the_owner_is_changed_when_the_mode_is_right() {
        let current = Ownership {
            uid: 1000,
            gid: 1000,
            mode: 0o700,
        };
        assert_eq!(
            steps(current, WANTED),
            vec![Step::Chown {
                uid: 65532,
                gid: 65532
            }]
        );
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("700"), Ok(0o700));
        assert!(parse_mode("9").is_err());
        assert!(parse_mode("77777").is_err());
    }
}
