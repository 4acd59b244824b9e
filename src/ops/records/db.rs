//! The one connection to the records database, SQLite or PostgreSQL, chosen by the URL.
//!
//! Both backends run the same SQL text (`$1` placeholders, which SQLite accepts too, and
//! only integers, doubles and text as column types), so every query is written once and
//! [`with_pool!`] instantiates it for each driver. Queries are checked at run time rather
//! than with `sqlx::query!`: compile-time checking needs a live database or offline metadata
//! per backend at every build, and the same text against two backends would need both; the
//! records tests run every query against a real SQLite and a real PostgreSQL instead.

use std::borrow::Cow;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::RecordsError;

/// How long a connection attempt may take before the database counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long SQLite waits on a lock held by another writer.
const SQLITE_BUSY: Duration = Duration::from_secs(5);

/// Which database a `records.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// `sqlite:///absolute/path.db`
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`
    Postgres(String),
}

impl DbUrl {
    /// Parses a database URL; `None` when the URL names no database (empty, `file://`).
    pub fn parse(url: &str) -> Result<Option<Self>, String> {
        let s = url.trim();
        if let Some(rest) = s.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or_default();
            if !path.starts_with('/') || path.ends_with('/') {
                return Err(format!(
                    "{s:?} must name a database file by absolute path, e.g. sqlite:///var/lib/sifucall/calls.db"
                ));
            }
            return Ok(Some(Self::Sqlite(PathBuf::from(path))));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            PgConnectOptions::from_str(s)
                .map_err(|e| format!("not a usable PostgreSQL URL ({e})"))?;
            return Ok(Some(Self::Postgres(s.to_owned())));
        }
        Ok(None)
    }

    /// The backend's name, for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// A pool for one of the two backends.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite (one daemon).
    Sqlite(SqlitePool),
    /// PostgreSQL (one or more daemons).
    Postgres(PgPool),
}

/// Runs the same code against whichever pool `db` holds: `with_pool!(db, pool => expr)`.
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::ops::records::db::Db::Sqlite($pool) => $body,
            $crate::ops::records::db::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

fn migrations(sql: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            sql.iter()
                .map(|(version, name, text)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*name),
                        MigrationType::Simple,
                        Cow::Borrowed(*text),
                        false,
                    )
                })
                .collect(),
        ),
        ..Migrator::DEFAULT
    }
}

/// The SQLite schema, embedded in the binary.
fn sqlite_migrator() -> Migrator {
    migrations(&[(
        1,
        "calls",
        include_str!("../../../migrations/sqlite/0001_calls.sql"),
    )])
}

/// The PostgreSQL schema, embedded in the binary.
fn postgres_migrator() -> Migrator {
    migrations(&[(
        1,
        "calls",
        include_str!("../../../migrations/postgres/0001_calls.sql"),
    )])
}

impl Db {
    /// Connects (creating a SQLite file and its directory on first start, in WAL mode) and
    /// applies the embedded migrations.
    pub async fn open(url: &DbUrl, max_connections: u32) -> Result<Self, RecordsError> {
        let db = match url {
            DbUrl::Sqlite(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| RecordsError::Io {
                        path: dir.to_owned(),
                        source,
                    })?;
                }
                let opts = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(SQLITE_BUSY);
                let pool = SqlitePoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect_with(opts)
                    .await
                    .map_err(|e| RecordsError::db("open the SQLite database", e))?;
                // Records hold what callers said: not world-readable (SQLite gives its -wal
                // and -shm files the database file's mode).
                use std::os::unix::fs::PermissionsExt as _;
                if let Ok(meta) = std::fs::metadata(path) {
                    let mode = meta.permissions().mode();
                    if mode & 0o007 != 0 {
                        let _ = std::fs::set_permissions(
                            path,
                            std::fs::Permissions::from_mode(mode & !0o007),
                        );
                    }
                }
                Self::Sqlite(pool)
            }
            DbUrl::Postgres(s) => {
                let opts = PgConnectOptions::from_str(s)
                    .map_err(|e| RecordsError::db("parse the PostgreSQL URL", e))?;
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect_with(opts)
                    .await
                    .map_err(|e| RecordsError::db("connect to PostgreSQL", e))?;
                Self::Postgres(pool)
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Applies the embedded migrations (idempotent; several daemons may race, the migrator
    /// takes a lock).
    pub async fn migrate(&self) -> Result<(), RecordsError> {
        let r = match self {
            Self::Sqlite(p) => sqlite_migrator().run(p).await,
            Self::Postgres(p) => postgres_migrator().run(p).await,
        };
        r.map_err(|e| RecordsError::db("apply the database migrations", e))
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }
}
