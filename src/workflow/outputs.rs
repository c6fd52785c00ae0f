//! A step's output directory between runs. Runs of one step and sub-group write to the
//! same directory (SPEC §6), one after the other, so before an attempt starts, what is
//! there is moved out of its way: the registered products of earlier runs to
//! `superseded/run-{id}/` (their copies follow them), anything else — what a failed or
//! killed attempt left — into the new attempt's log directory. No run overwrites
//! another's products, and collection sees only what its own attempt wrote.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

fn with_path(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn create_dirs(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(with_path(dir))
}

/// Moves a registered product's file to `to`. True when the file is at `to` afterwards —
/// also when an earlier holder moved it and died before recording that; false when it
/// is in neither place.
pub fn move_product(from: &Path, to: &Path) -> io::Result<bool> {
    if from.symlink_metadata().is_ok() {
        if let Some(parent) = to.parent() {
            create_dirs(parent)?;
        }
        std::fs::rename(from, to).map_err(with_path(from))?;
        return Ok(true);
    }
    Ok(to.symlink_metadata().is_ok())
}

/// The first symbolic link among the components of `path` below `root` (`path` itself
/// included, `root` not). A job may replace any directory it can write with a link to
/// anywhere; no path through one is ever read or written by the managers.
pub fn first_link(root: &Path, path: &Path) -> io::Result<Option<PathBuf>> {
    let Ok(rest) = path.strip_prefix(root) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not below {}", path.display(), root.display()),
        ));
    };
    let mut current = root.to_path_buf();
    for component in rest.components() {
        current.push(component);
        match current.symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() => return Ok(Some(current)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(with_path(&current)(e)),
        }
    }
    Ok(None)
}

/// Moves the first link on the way from `root` to `dir` (the link itself, never what it
/// points to) into `dest` as `<name>.link`. True when there was one.
pub fn set_aside_link(root: &Path, dir: &Path, dest: &Path) -> io::Result<bool> {
    let Some(link) = first_link(root, dir)? else {
        return Ok(false);
    };
    create_dirs(dest)?;
    let mut target = dest.join(link.file_name().unwrap_or_default());
    target.as_mut_os_string().push(".link");
    std::fs::rename(&link, &target).map_err(with_path(&link))?;
    Ok(true)
}

/// Moves every entry of `dir` that holds anything into `dest` (created when needed);
/// empty directories stay. Returns how many entries were moved.
///
/// A link at `dir` or at any of its components below `root` is itself what is moved
/// ([`set_aside_link`]), so nothing is renamed through it.
pub fn move_leftovers(root: &Path, dir: &Path, dest: &Path) -> io::Result<usize> {
    if set_aside_link(root, dir, dest)? {
        return Ok(1);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(with_path(dir)(e)),
    };
    let mut moved = 0;
    for entry in entries {
        let path = entry.map_err(with_path(dir))?.path();
        if is_empty_tree(&path)? {
            continue;
        }
        create_dirs(dest)?;
        let target = dest.join(path.file_name().expect("a directory entry has a name"));
        std::fs::rename(&path, &target).map_err(with_path(&path))?;
        moved += 1;
    }
    Ok(moved)
}

/// A directory (not a link to one) with no file anywhere below it.
fn is_empty_tree(path: &Path) -> io::Result<bool> {
    let meta = path.symlink_metadata().map_err(with_path(path))?;
    if !meta.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(path).map_err(with_path(path))? {
        if !is_empty_tree(&entry.map_err(with_path(path))?.path())? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_move_once_and_a_finished_move_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("output/science/map.fits");
        let to = dir.path().join("superseded/run-3/output/science/map.fits");
        std::fs::create_dir_all(from.parent().unwrap()).unwrap();
        std::fs::write(&from, b"map").unwrap();
        assert!(move_product(&from, &to).unwrap());
        assert_eq!(std::fs::read(&to).unwrap(), b"map");
        assert!(!from.exists());
        // Moved by an instance that died before recording it.
        assert!(move_product(&from, &to).unwrap());
        assert!(!move_product(&from, &dir.path().join("elsewhere")).unwrap());
    }

    #[test]
    fn leftovers_move_and_empty_directories_stay() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("output");
        for kind in ["science", "qa", "plots"] {
            std::fs::create_dir_all(out.join(kind)).unwrap();
        }
        std::fs::create_dir_all(out.join("plots/deep/er")).unwrap();
        std::fs::write(out.join("science/partial.fits"), b"half").unwrap();
        std::fs::write(out.join("stray.txt"), b"x").unwrap();
        let dest = dir
            .path()
            .join("config/map/run-1/attempt-2/previous-output");
        assert_eq!(move_leftovers(dir.path(), &out, &dest).unwrap(), 2);
        assert_eq!(
            std::fs::read(dest.join("science/partial.fits")).unwrap(),
            b"half"
        );
        assert!(dest.join("stray.txt").is_file());
        assert!(out.join("qa").is_dir() && out.join("plots/deep/er").is_dir());
        assert!(!out.join("science").exists());
        assert_eq!(move_leftovers(dir.path(), &out, &dest).unwrap(), 0);
        assert_eq!(
            move_leftovers(dir.path(), &dir.path().join("none"), &dest).unwrap(),
            0
        );
    }

    #[test]
    fn a_link_above_the_output_is_moved_itself_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("cal")).unwrap();
        std::fs::write(elsewhere.join("cal/precious.fits"), b"keep").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        // The job replaced workspace/ (above its step's directory) with a link.
        std::os::unix::fs::symlink(&elsewhere, run.join("workspace")).unwrap();
        let out = run.join("workspace/cal");
        assert_eq!(first_link(&run, &out).unwrap(), Some(run.join("workspace")));
        let dest = run.join("config/cal/run-1/attempt-2/previous-output");
        assert_eq!(move_leftovers(&run, &out, &dest).unwrap(), 1);
        assert_eq!(
            std::fs::read(elsewhere.join("cal/precious.fits")).unwrap(),
            b"keep",
            "nothing moved through the link"
        );
        assert!(
            dest.join("workspace.link")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(first_link(&run, &out).unwrap(), None);
    }
}
