//! Where record writes wait while the database cannot take them: a directory of batch
//! files, each written whole (temporary name, fsync, rename) and replayed oldest first once
//! the database is back. Every write it holds is an upsert, so replaying a batch twice (a
//! crash between the database commit and the file's removal) changes nothing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::store::Op;

/// Why a batch could not be spooled.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file system refused (full, read-only, not a directory...).
    #[error("cannot write the records spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `records.spool_max_mb` would be exceeded.
    #[error("the records spool {path} is full ({used} bytes, limit {limit})")]
    Full {
        /// The directory.
        path: PathBuf,
        /// Bytes already spooled.
        used: u64,
        /// The limit.
        limit: u64,
    },
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    seq: AtomicU64,
}

impl Spool {
    /// A spool in `dir` (created when first needed) holding at most `max_bytes`.
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            seq: AtomicU64::new(0),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError {
        let path = path.to_owned();
        move |source| SpoolError::Io { path, source }
    }

    /// Batch files waiting, oldest first.
    pub fn pending(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        files
    }

    /// Whether anything waits.
    pub fn is_empty(&self) -> bool {
        self.pending().is_empty()
    }

    fn used(&self) -> u64 {
        self.pending()
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Writes one batch as one file.
    pub fn put(&self, ops: &[Op]) -> Result<(), SpoolError> {
        let mut text = Vec::new();
        for op in ops {
            // Ops are plain data; serialising them cannot fail.
            if serde_json::to_writer(&mut text, op).is_ok() {
                text.push(b'\n');
            }
        }
        let used = self.used();
        if used + text.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full {
                path: self.dir.clone(),
                used,
                limit: self.max_bytes,
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{now:020}-{}-{seq:08}", std::process::id());
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(format!("{name}.jsonl"));
        let written = (|| {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(SpoolError::Io { path, source: e });
        }
        Ok(())
    }

    /// Reads one batch file; lines this version cannot read are skipped.
    pub fn read(&self, path: &Path) -> Result<Vec<Op>, SpoolError> {
        let text = std::fs::read_to_string(path).map_err(self.io(path))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Removes a batch file once its writes are in the database.
    pub fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a replayed records spool file; it will be replayed again (harmless)");
        }
    }
}
