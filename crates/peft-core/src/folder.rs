//! Output folders that appear whole or not at all.
//!
//! A folder is built in a hidden temporary sibling (a name no user folder has: `.<name>.XXXX.partial`)
//! and renamed into place at the end. An existing folder it replaces is moved aside first and
//! deleted only once the new one is in place, so a failure at any point leaves either the old
//! folder or the new one, never a mix and never nothing.

use std::path::{Path, PathBuf};

use crate::{PeftError, Result};

fn parent_and_name(out: &Path) -> Result<(PathBuf, String)> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| PeftError::Other(format!("{}: not a folder name", out.display())))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((parent.to_path_buf(), name))
}

/// Build the folder `out` through `fill`, which writes into the temporary folder it is given.
/// An existing `out` is replaced only after `fill` succeeded (callers decide beforehand whether
/// replacing is allowed). On failure the temporary folder is removed.
pub fn write_folder<E: From<PeftError>>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let (parent, name) = parent_and_name(out)?;
    std::fs::create_dir_all(&parent).map_err(|e| PeftError::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempdir_in(&parent)
        .map_err(|e| PeftError::io(&parent, e))?;
    fill(tmp.path())?;
    let aside = if out.exists() {
        Some(move_aside(out)?)
    } else {
        None
    };
    let built = tmp.keep();
    if let Err(e) = std::fs::rename(&built, out) {
        // Put the old folder back; the new one is dropped.
        if let Some(old) = &aside {
            let _ = std::fs::rename(old, out);
        }
        let _ = std::fs::remove_dir_all(&built);
        return Err(PeftError::io(out, e).into());
    }
    if let Some(old) = aside {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// Rename `path` to a fresh hidden sibling (`.<name>.XXXX.replaced`) and return that path: the
/// old contents stay on disk until the caller deletes them or moves them back.
pub fn move_aside(path: &Path) -> Result<PathBuf> {
    let (parent, name) = parent_and_name(path)?;
    // An empty directory reserves the name; renaming a folder onto an empty one replaces it.
    let slot = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".replaced")
        .tempdir_in(&parent)
        .map_err(|e| PeftError::io(&parent, e))?
        .keep();
    if path.is_dir() {
        std::fs::rename(path, &slot).map_err(|e| PeftError::io(path, e))?;
    } else {
        let _ = std::fs::remove_dir(&slot);
        std::fs::rename(path, &slot).map_err(|e| PeftError::io(path, e))?;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_after_success_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        // An unrelated folder with the old temporary name is never touched.
        std::fs::create_dir(dir.path().join("model.tmp")).unwrap();
        std::fs::write(dir.path().join("model.tmp/keep"), "mine").unwrap();

        write_folder::<PeftError>(&out, |tmp| Ok(std::fs::write(tmp.join("a"), "1").unwrap()))
            .unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "1");

        let failed = write_folder::<PeftError>(&out, |tmp| {
            std::fs::write(tmp.join("a"), "2").unwrap();
            Err(PeftError::Other("disk full".into()))
        });
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read_to_string(out.join("a")).unwrap(),
            "1",
            "old folder must survive a failed write"
        );

        write_folder::<PeftError>(&out, |tmp| Ok(std::fs::write(tmp.join("b"), "3").unwrap()))
            .unwrap();
        assert!(!out.join("a").exists() && out.join("b").exists());

        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["model", "model.tmp"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("model.tmp/keep")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn move_aside_keeps_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("x"), "old").unwrap();
        let aside = move_aside(&out).unwrap();
        assert!(!out.exists());
        assert_eq!(std::fs::read_to_string(aside.join("x")).unwrap(), "old");
    }
}
