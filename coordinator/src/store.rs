//! Durable storage for workflow definitions and runs: one [`WorkflowStore`] trait and one
//! implementation on sqlx's `Any` driver, so SQLite (embedded default: one file, WAL, fsync on
//! every commit) and PostgreSQL share the same SQL and the same conformance tests. Queries are
//! checked at run time, so building needs no database.
//!
//! A run's history append, its state, its outbox (calls to send) and its timers are written in
//! one transaction ([`WorkflowStore::commit`]), guarded by the run's event count (optimistic
//! concurrency): a writer that read an older state cannot commit.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The run changed since it was read (another writer, or a stale coordinator).
    #[error("run {0} changed concurrently; reload and retry")]
    Conflict(String),
    /// Another coordinator owns the run now (its fencing token is newer): this write is
    /// rejected, whatever this coordinator believed.
    #[error("run {0} is owned by another coordinator (fenced)")]
    Fenced(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The shared transaction this write was grouped into failed (group commit): the write
    /// did not happen; the same error reached every write of that transaction.
    #[error("database (group commit of {writes} writes): {message}")]
    Group {
        /// Writes in the failed transaction.
        writes: usize,
        /// The database error.
        message: String,
    },
}

/// `Result` with [`StoreError`].
pub type StoreResult<T> = Result<T, StoreError>;

/// A stored run (summary and state).
#[derive(Debug, Clone)]
pub struct RunRow {
    /// Run id.
    pub run_id: String,
    /// Workflow `namespace/name`.
    pub workflow: String,
    /// Pinned definition version.
    pub version: u32,
    /// Status name.
    pub status: String,
    /// The run state (JSON of `engine::RunState`).
    pub state: String,
    /// Events in the history.
    pub seq: u64,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
}

/// A stored definition version.
#[derive(Debug, Clone)]
pub struct DefinitionRow {
    /// `namespace/name`.
    pub workflow: String,
    /// Version (1, 2, …).
    pub version: u32,
    /// The definition (JSON of `policies::workflow::Workflow`).
    pub spec: String,
    /// Registered, Unix ms.
    pub created_ms: u64,
}

/// Who may write a run: a coordinator (`node`) holding the run's lease with fencing token
/// `fence` (incremented each time the run changes owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Coordinator id.
    pub node: String,
    /// Fencing token.
    pub fence: u64,
    /// The lease runs until, Unix ms (written on create and renewed by `acquire`).
    pub lease_until_ms: u64,
}

/// One transaction's worth of a run's changes.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// The writer's ownership (`None`: unfenced, for single-coordinator tools and tests).
    pub owner: Option<Owner>,
    /// Run id.
    pub run_id: String,
    /// The event count the writer read (the commit fails if it changed).
    pub expected_seq: u64,
    /// New events (JSON), appended after `expected_seq`.
    pub events: Vec<String>,
    /// New state (JSON).
    pub state: String,
    /// New status name.
    pub status: String,
    /// When, Unix ms.
    pub now_ms: u64,
    /// The run's complete outbox after this commit: (key, dispatch JSON).
    pub outbox: Vec<(String, String)>,
    /// The run's complete timer set after this commit: (key, timer JSON, due Unix ms).
    pub timers: Vec<(String, String, u64)>,
}

/// A new run.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Run id (caller-given or generated).
    pub run_id: String,
    /// Workflow `namespace/name`.
    pub workflow: String,
    /// Pinned version.
    pub version: u32,
    /// The first commit (its `expected_seq` is 0).
    pub commit: Commit,
}

/// A due timer.
#[derive(Debug, Clone)]
pub struct DueTimer {
    /// Run id.
    pub run_id: String,
    /// Timer JSON.
    pub timer: String,
    /// Due, Unix ms.
    pub due_ms: u64,
}

/// An outbox entry.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// Run id.
    pub run_id: String,
    /// Key within the run.
    pub key: String,
    /// Dispatch JSON.
    pub dispatch: String,
}

/// Durable workflow storage.
#[async_trait]
pub trait WorkflowStore: Send + Sync {
    /// Registers a definition; an unchanged spec keeps its version, a changed one gets the
    /// next. Returns the version.
    async fn put_definition(&self, workflow: &str, spec: &str, now_ms: u64) -> StoreResult<u32>;
    /// A definition version (the latest when `version` is `None`).
    async fn definition(
        &self,
        workflow: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<DefinitionRow>>;
    /// The latest version of every definition.
    async fn definitions(&self) -> StoreResult<Vec<DefinitionRow>>;
    /// Creates a run; `false` when the id exists already (the caller reads that run).
    async fn create_run(&self, run: &NewRun) -> StoreResult<bool>;
    /// Appends events and replaces state, outbox and timers in one transaction.
    async fn commit(&self, commit: &Commit) -> StoreResult<()>;
    /// One run.
    async fn run(&self, run_id: &str) -> StoreResult<Option<RunRow>>;
    /// A run's history (event JSON, in order).
    async fn history(&self, run_id: &str) -> StoreResult<Vec<String>>;
    /// Runs, newest first, optionally by workflow and status, at most `limit`.
    async fn runs(
        &self,
        workflow: Option<&str>,
        status: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<RunRow>>;
    /// Timers due at `now_ms`, earliest first, at most `limit`; with `node`, only of runs it
    /// owns.
    async fn due_timers(
        &self,
        now_ms: u64,
        limit: u32,
        node: Option<&str>,
    ) -> StoreResult<Vec<DueTimer>>;
    /// The earliest timer, Unix ms.
    async fn next_timer(&self, node: Option<&str>) -> StoreResult<Option<u64>>;
    /// Outbox entries (calls to send), at most `limit`; with `node`, only of runs it owns.
    async fn outbox(&self, limit: u32, node: Option<&str>) -> StoreResult<Vec<OutboxEntry>>;
    /// Deletes runs finished before `before_ms` (retention). Returns how many.
    async fn purge_finished(&self, before_ms: u64) -> StoreResult<u64>;
    /// (runs not finished, timers pending), for gauges.
    async fn counts(&self) -> StoreResult<(u64, u64)>;
    /// Takes or renews leases: every unfinished run owned by `node`, unowned, or whose lease
    /// expired before `now_ms` (at most `limit`, skipping rows another coordinator is
    /// claiming: `FOR UPDATE SKIP LOCKED` on PostgreSQL) now belongs to `node` until
    /// `lease_until_ms`; a run changing owner gets the next fencing token. Returns
    /// (run id, fence) of every run `node` now holds.
    async fn acquire(
        &self,
        node: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<(String, u64)>>;
    /// Runs `node` owns (whatever their leases), e.g. after its own restart.
    async fn owned_by(&self, node: &str) -> StoreResult<Vec<String>>;
    /// Moves one timer to `due_ms` (a timer whose handling failed is retried later).
    async fn defer_timer(&self, run_id: &str, key: &str, due_ms: u64) -> StoreResult<()>;
    /// The store's clock minus this host's, ms, with the round trip it was measured over:
    /// the one clock every coordinator sharing the store measures leases and timers by.
    /// PostgreSQL: `clock_timestamp()` of the server, best of three samples on one connection
    /// (so waiting for a pooled connection is not counted). `None` where the store has no clock
    /// of its own (SQLite: embedded, it *is* this host's clock).
    async fn clock_offset(&self) -> StoreResult<Option<(i64, u64)>>;
}

const TERMINAL: &str = "('Completed','Failed','Compensated','CompensationFailed','Cancelled','Terminated','TimedOut','HistoryLimitExceeded')";

/// [`WorkflowStore`] on sqlx `Any`: `sqlite://path` or `postgres://…`.
///
/// **Group commit.** Run writes ([`WorkflowStore::create_run`], [`WorkflowStore::commit`])
/// from concurrent runs are queued to writer tasks that put whatever is waiting (up to
/// [`StoreOptions::commit_batch`]) into one transaction — one WAL fsync on SQLite, one on
/// PostgreSQL. Each write's guard (the run's event count and fencing token, or the insert of a
/// new run) runs first and changes nothing when it refuses, so a write that conflicts or is
/// fenced is refused alone and the others commit; the changes of all the others then go in five
/// multi-row statements. A caller's future resolves only after the shared
/// transaction committed (durable) or failed (then its write did not happen), so "fsynced
/// before any effect is dispatched" holds per write. Nothing waits for a batch to fill: a write
/// that finds the writer idle goes at once, alone.
pub struct SqlStore {
    pool: AnyPool,
    postgres: bool,
    writes: tokio::sync::mpsc::Sender<QueuedWrite>,
}

/// How [`SqlStore`] writes.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most run writes (creates and commits) one transaction carries; 1 gives every write its
    /// own transaction (and fsync). Default 64.
    pub commit_batch: usize,
    /// Observes the number of run writes in each transaction (its count is the number of
    /// write transactions), e.g. `meshflow_workflow_store_transaction_writes`.
    pub batch_sizes: Option<prometheus::Histogram>,
    /// Writer tasks (transactions in flight at once); `None`: 1 on SQLite (one writer at a
    /// time anyway), 2 on PostgreSQL (one transaction fills while the other commits).
    pub writers: Option<usize>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            commit_batch: 64,
            batch_sizes: None,
            writers: None,
        }
    }
}

/// A run write waiting for a writer task.
enum RunWrite {
    Create(NewRun),
    Commit(Commit),
}

impl RunWrite {
    fn run_id(&self) -> &str {
        match self {
            RunWrite::Create(run) => &run.run_id,
            RunWrite::Commit(commit) => &commit.run_id,
        }
    }
}

/// A write and where its outcome goes (`true`: a create inserted the run, or a commit).
struct QueuedWrite {
    write: RunWrite,
    done: tokio::sync::oneshot::Sender<StoreResult<bool>>,
}

impl SqlStore {
    /// Opens (creating if needed) the store at `url` and applies the schema.
    /// SQLite: `sqlite:///abs/path.db` — WAL journal, `synchronous=FULL` (fsync on commit),
    /// busy timeout 5 s.
    ///
    /// # Errors
    /// The database error.
    pub async fn open(url: &str) -> StoreResult<Self> {
        Self::open_with(url, StoreOptions::default()).await
    }

    /// [`SqlStore::open`] with [`StoreOptions`] (group commit size, writers, batch metric).
    /// Spawns the writer tasks on the current Tokio runtime.
    ///
    /// # Errors
    /// The database error.
    pub async fn open_with(url: &str, options: StoreOptions) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        sqlx::query("PRAGMA journal_mode=WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous=FULL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout=5000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let (writes, queue) = tokio::sync::mpsc::channel(4096);
        let store = Self {
            pool: pool.clone(),
            postgres: !sqlite,
            writes,
        };
        store.migrate().await?;
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let writers = options.writers.unwrap_or(if sqlite { 1 } else { 2 }).max(1);
        for _ in 0..writers {
            tokio::spawn(write_loop(
                pool.clone(),
                queue.clone(),
                options.commit_batch.max(1),
                options.batch_sizes.clone(),
            ));
        }
        Ok(store)
    }

    /// Queues `write` for a writer task and waits for its transaction's outcome.
    async fn write(&self, write: RunWrite) -> StoreResult<bool> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let stopped = || StoreError::Group {
            writes: 0,
            message: "the store's writer stopped".into(),
        };
        self.writes
            .send(QueuedWrite { write, done })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    async fn migrate(&self) -> StoreResult<()> {
        for statement in [
            "CREATE TABLE IF NOT EXISTS wf_definitions (workflow TEXT NOT NULL, version BIGINT NOT NULL, spec TEXT NOT NULL, created_ms BIGINT NOT NULL, PRIMARY KEY (workflow, version))",
            "CREATE TABLE IF NOT EXISTS wf_runs (run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, version BIGINT NOT NULL, status TEXT NOT NULL, state TEXT NOT NULL, seq BIGINT NOT NULL, created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, owner TEXT NOT NULL DEFAULT '', lease_until BIGINT NOT NULL DEFAULT 0, fence BIGINT NOT NULL DEFAULT 0)",
            "CREATE INDEX IF NOT EXISTS wf_runs_by_workflow ON wf_runs (workflow, status)",
            "CREATE TABLE IF NOT EXISTS wf_events (run_id TEXT NOT NULL, seq BIGINT NOT NULL, event TEXT NOT NULL, PRIMARY KEY (run_id, seq))",
            "CREATE TABLE IF NOT EXISTS wf_outbox (run_id TEXT NOT NULL, key TEXT NOT NULL, dispatch TEXT NOT NULL, PRIMARY KEY (run_id, key))",
            "CREATE TABLE IF NOT EXISTS wf_timers (run_id TEXT NOT NULL, key TEXT NOT NULL, timer TEXT NOT NULL, due_ms BIGINT NOT NULL, PRIMARY KEY (run_id, key))",
            "CREATE INDEX IF NOT EXISTS wf_timers_due ON wf_timers (due_ms)",
        ] {
            sqlx::query(statement).execute(&self.pool).await?;
        }
        Ok(())
    }
}

fn run_row(row: &AnyRow) -> StoreResult<RunRow> {
    Ok(RunRow {
        run_id: row.try_get("run_id")?,
        workflow: row.try_get("workflow")?,
        version: row.try_get::<i64, _>("version")? as u32,
        status: row.try_get("status")?,
        state: row.try_get("state")?,
        seq: row.try_get::<i64, _>("seq")? as u64,
        created_ms: row.try_get::<i64, _>("created_ms")? as u64,
        updated_ms: row.try_get::<i64, _>("updated_ms")? as u64,
    })
}

fn definition_row(row: &AnyRow) -> StoreResult<DefinitionRow> {
    Ok(DefinitionRow {
        workflow: row.try_get("workflow")?,
        version: row.try_get::<i64, _>("version")? as u32,
        spec: row.try_get("spec")?,
        created_ms: row.try_get::<i64, _>("created_ms")? as u64,
    })
}

/// A value bound into a multi-row statement.
enum Param<'a> {
    Text(&'a str),
    Int(i64),
}

/// Rows per multi-row statement (4 columns at most: far below SQLite's and PostgreSQL's
/// parameter limits).
const ROWS_PER_STATEMENT: usize = 250;

/// `INSERT INTO <head> VALUES (…), (…)` for `rows` (each `columns` wide), in statements of at
/// most [`ROWS_PER_STATEMENT`] rows.
async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    head: &str,
    columns: usize,
    rows: &[Vec<Param<'_>>],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql = format!("INSERT INTO {head} VALUES ");
        for (r, _) in chunk.iter().enumerate() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..columns {
                if c > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", r * columns + c + 1));
            }
            sql.push(')');
        }
        let mut query = sqlx::query(&sql);
        for row in chunk {
            for value in row {
                query = match value {
                    Param::Text(t) => query.bind(*t),
                    Param::Int(i) => query.bind(*i),
                };
            }
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// `DELETE FROM <table> WHERE run_id IN (…)` for `runs`, in statements of at most
/// [`ROWS_PER_STATEMENT`] ids.
async fn delete_runs_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    table: &str,
    runs: &[&str],
) -> Result<(), sqlx::Error> {
    for chunk in runs.chunks(ROWS_PER_STATEMENT) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "DELETE FROM {table} WHERE run_id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for run in chunk {
            query = query.bind(*run);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Writes the events, outboxes and timer sets of `commits` (whose guards passed) inside `tx`:
/// five multi-row statements for the whole group, whatever its size (one per event, outbox
/// entry and timer would be ~8 statements per write, each a round trip to SQLite's worker
/// thread or to PostgreSQL).
async fn write_changes(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    commits: &[&Commit],
) -> Result<(), sqlx::Error> {
    let events: Vec<Vec<Param<'_>>> = commits
        .iter()
        .flat_map(|c| {
            c.events.iter().enumerate().map(|(i, event)| {
                vec![
                    Param::Text(&c.run_id),
                    Param::Int((c.expected_seq + i as u64 + 1) as i64),
                    Param::Text(event),
                ]
            })
        })
        .collect();
    insert_rows(tx, "wf_events (run_id, seq, event)", 3, &events).await?;
    let runs: Vec<&str> = commits.iter().map(|c| c.run_id.as_str()).collect();
    delete_runs_rows(tx, "wf_outbox", &runs).await?;
    let outbox: Vec<Vec<Param<'_>>> = commits
        .iter()
        .flat_map(|c| {
            c.outbox.iter().map(|(key, dispatch)| {
                vec![
                    Param::Text(&c.run_id),
                    Param::Text(key),
                    Param::Text(dispatch),
                ]
            })
        })
        .collect();
    insert_rows(tx, "wf_outbox (run_id, key, dispatch)", 3, &outbox).await?;
    delete_runs_rows(tx, "wf_timers", &runs).await?;
    let timers: Vec<Vec<Param<'_>>> = commits
        .iter()
        .flat_map(|c| {
            c.timers.iter().map(|(key, timer, due)| {
                vec![
                    Param::Text(&c.run_id),
                    Param::Text(key),
                    Param::Text(timer),
                    Param::Int(*due as i64),
                ]
            })
        })
        .collect();
    insert_rows(tx, "wf_timers (run_id, key, timer, due_ms)", 4, &timers).await?;
    Ok(())
}

/// A writer task: takes what waits in `queue` (at least one write, at most `batch`) and writes
/// it in one transaction, until the store is dropped.
async fn write_loop(
    pool: AnyPool,
    queue: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<QueuedWrite>>>,
    batch: usize,
    batch_sizes: Option<prometheus::Histogram>,
) {
    loop {
        let mut writes = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            writes.push(first);
            while writes.len() < batch {
                match queue.try_recv() {
                    Ok(next) => writes.push(next),
                    Err(_) => break,
                }
            }
        }
        if let Some(h) = &batch_sizes {
            h.observe(writes.len() as f64);
        }
        // Rows locked in one order (PostgreSQL): two transactions never wait on each other
        // in a cycle.
        writes.sort_by(|a, b| a.write.run_id().cmp(b.write.run_id()));
        let mut outcomes = write_group(&pool, &writes).await;
        if writes.len() > 1
            && outcomes
                .iter()
                .any(|o| matches!(o, Err(StoreError::Group { .. })))
        {
            // One bad write must not fail its neighbours: each again, alone.
            for (i, queued) in writes.iter().enumerate() {
                if matches!(outcomes[i], Err(StoreError::Group { .. })) {
                    if let Some(alone) =
                        write_group(&pool, std::slice::from_ref(queued)).await.pop()
                    {
                        outcomes[i] = alone;
                    }
                }
            }
        }
        for (queued, outcome) in writes.into_iter().zip(outcomes) {
            let _ = queued.done.send(outcome);
        }
    }
}

/// Writes `writes` in one transaction; one outcome per write. Each write's guard (the insert
/// of a new run, or the event-count and fencing check of a commit) runs first and changes
/// nothing when it refuses; then the changes of every write whose guard passed go in a few
/// multi-row statements, and the transaction commits. A database error fails the whole group
/// (nothing of it is written; PostgreSQL could not continue the transaction anyway).
async fn write_group(pool: &AnyPool, writes: &[QueuedWrite]) -> Vec<StoreResult<bool>> {
    let n = writes.len();
    // The transaction is gone: every write fails with `e`, also those whose guard refused or
    // found their run — what a rolled-back transaction saw proves nothing (a run "found" may
    // have been this group's own insert).
    let fail = |e: sqlx::Error| -> Vec<StoreResult<bool>> {
        if n == 1 {
            return vec![Err(e.into())];
        }
        let message = e.to_string();
        (0..n)
            .map(|_| {
                Err(StoreError::Group {
                    writes: n,
                    message: message.clone(),
                })
            })
            .collect()
    };
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail(e),
    };
    let mut outcomes = Vec::with_capacity(n);
    for queued in writes {
        match guard_write(&mut tx, &queued.write).await {
            Err(StoreError::Db(e)) => {
                drop(tx);
                return fail(e);
            }
            outcome => outcomes.push(outcome),
        }
    }
    let applied: Vec<&Commit> = writes
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, Ok(true)))
        .map(|(q, _)| match &q.write {
            RunWrite::Create(run) => &run.commit,
            RunWrite::Commit(commit) => commit,
        })
        .collect();
    if applied.is_empty() {
        return outcomes;
    }
    if let Err(e) = write_changes(&mut tx, &applied).await {
        drop(tx);
        return fail(e);
    }
    if let Err(e) = tx.commit().await {
        return fail(e);
    }
    outcomes
}

/// One run write's guard inside `tx`: `Ok(true)` when the write applies (a new run's row
/// inserted, or a commit's run row updated; the caller writes its changes), `Ok(false)` for a
/// create whose run id exists, `Conflict`/`Fenced` for a refused commit — the refusals change
/// nothing.
async fn guard_write(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    write: &RunWrite,
) -> StoreResult<bool> {
    match write {
        RunWrite::Create(run) => {
            let (owner, lease, fence) = match &run.commit.owner {
                Some(o) => (o.node.clone(), o.lease_until_ms as i64, o.fence as i64),
                None => (String::new(), 0, 0),
            };
            let inserted = sqlx::query("INSERT INTO wf_runs (run_id, workflow, version, status, state, seq, created_ms, updated_ms, owner, lease_until, fence) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10) ON CONFLICT (run_id) DO NOTHING")
                .bind(&run.run_id)
                .bind(&run.workflow)
                .bind(run.version as i64)
                .bind(&run.commit.status)
                .bind(&run.commit.state)
                .bind(run.commit.events.len() as i64)
                .bind(run.commit.now_ms as i64)
                .bind(owner)
                .bind(lease)
                .bind(fence)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            Ok(inserted > 0)
        }
        RunWrite::Commit(commit) => {
            let (node, fence) = match &commit.owner {
                Some(o) => (o.node.clone(), o.fence as i64),
                None => (String::new(), -1),
            };
            // With an owner, the write also needs the run's current owner and fencing token:
            // a coordinator that lost its lease can never commit.
            // A commit by the owner also extends its lease (never shortens it): a run whose row
            // is busy with commits may be skipped by a renewal (SKIP LOCKED), and must not
            // expire for it.
            let lease = commit
                .owner
                .as_ref()
                .map_or(-1, |o| o.lease_until_ms as i64);
            let updated = sqlx::query("UPDATE wf_runs SET seq = $1, state = $2, status = $3, updated_ms = $4, lease_until = CASE WHEN $9 > lease_until THEN $9 ELSE lease_until END WHERE run_id = $5 AND seq = $6 AND ($7 = -1 OR (owner = $8 AND fence = $7))")
                .bind((commit.expected_seq + commit.events.len() as u64) as i64)
                .bind(&commit.state)
                .bind(&commit.status)
                .bind(commit.now_ms as i64)
                .bind(&commit.run_id)
                .bind(commit.expected_seq as i64)
                .bind(fence)
                .bind(&node)
                .bind(lease)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if updated != 1 {
                if fence >= 0 {
                    let row = sqlx::query("SELECT owner, fence FROM wf_runs WHERE run_id = $1")
                        .bind(&commit.run_id)
                        .fetch_optional(&mut **tx)
                        .await?;
                    if let Some(row) = row {
                        let (o, f): (String, i64) = (row.try_get("owner")?, row.try_get("fence")?);
                        if o != node || f != fence {
                            return Err(StoreError::Fenced(commit.run_id.clone()));
                        }
                    }
                }
                return Err(StoreError::Conflict(commit.run_id.clone()));
            }
            Ok(true)
        }
    }
}

impl SqlStore {
    /// One attempt of [`WorkflowStore::put_definition`].
    async fn try_put_definition(
        &self,
        workflow: &str,
        spec: &str,
        now_ms: u64,
    ) -> StoreResult<u32> {
        let mut tx = self.pool.begin().await?;
        let latest = sqlx::query("SELECT workflow, version, spec, created_ms FROM wf_definitions WHERE workflow = $1 ORDER BY version DESC LIMIT 1")
            .bind(workflow)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = &latest {
            let row = definition_row(row)?;
            if row.spec == spec {
                return Ok(row.version);
            }
        }
        let version = latest
            .map(|r| definition_row(&r).map(|d| d.version))
            .transpose()?
            .unwrap_or(0)
            + 1;
        sqlx::query("INSERT INTO wf_definitions (workflow, version, spec, created_ms) VALUES ($1, $2, $3, $4)")
            .bind(workflow)
            .bind(version as i64)
            .bind(spec)
            .bind(now_ms as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(version)
    }
}

#[async_trait]
impl WorkflowStore for SqlStore {
    async fn put_definition(&self, workflow: &str, spec: &str, now_ms: u64) -> StoreResult<u32> {
        // Several coordinators may register the same definition at once (every control-plane
        // replica registers each Workflow custom resource): the loser of the insert race reads
        // again, and gets the winner's version when the spec is the same.
        let mut attempt = 0;
        loop {
            match self.try_put_definition(workflow, spec, now_ms).await {
                Err(StoreError::Db(sqlx::Error::Database(e)))
                    if e.is_unique_violation() && attempt < 3 =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn definition(
        &self,
        workflow: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<DefinitionRow>> {
        let row = match version {
            Some(v) => sqlx::query("SELECT workflow, version, spec, created_ms FROM wf_definitions WHERE workflow = $1 AND version = $2")
                .bind(workflow)
                .bind(v as i64)
                .fetch_optional(&self.pool)
                .await?,
            None => sqlx::query("SELECT workflow, version, spec, created_ms FROM wf_definitions WHERE workflow = $1 ORDER BY version DESC LIMIT 1")
                .bind(workflow)
                .fetch_optional(&self.pool)
                .await?,
        };
        row.as_ref().map(definition_row).transpose()
    }

    async fn definitions(&self) -> StoreResult<Vec<DefinitionRow>> {
        let rows = sqlx::query("SELECT d.workflow, d.version, d.spec, d.created_ms FROM wf_definitions d WHERE d.version = (SELECT MAX(version) FROM wf_definitions e WHERE e.workflow = d.workflow) ORDER BY d.workflow")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(definition_row).collect()
    }

    async fn create_run(&self, run: &NewRun) -> StoreResult<bool> {
        self.write(RunWrite::Create(run.clone())).await
    }

    async fn commit(&self, commit: &Commit) -> StoreResult<()> {
        self.write(RunWrite::Commit(commit.clone()))
            .await
            .map(|_| ())
    }

    async fn acquire(
        &self,
        node: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<(String, u64)>> {
        let lock = if self.postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE wf_runs SET fence = CASE WHEN owner = $1 THEN fence ELSE fence + 1 END, owner = $1, lease_until = $2 \
             WHERE run_id IN (SELECT run_id FROM wf_runs WHERE status NOT IN {TERMINAL} AND (owner = $1 OR owner = '' OR lease_until < $3) ORDER BY run_id LIMIT $4{lock}) \
             RETURNING run_id, fence"
        );
        let rows = sqlx::query(&sql)
            .bind(node)
            .bind(lease_until_ms as i64)
            .bind(now_ms as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("run_id")?,
                    r.try_get::<i64, _>("fence")? as u64,
                ))
            })
            .collect()
    }

    async fn owned_by(&self, node: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(&format!(
            "SELECT run_id FROM wf_runs WHERE owner = $1 AND status NOT IN {TERMINAL}"
        ))
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("run_id").map_err(StoreError::from))
            .collect()
    }

    async fn run(&self, run_id: &str) -> StoreResult<Option<RunRow>> {
        let row = sqlx::query("SELECT run_id, workflow, version, status, state, seq, created_ms, updated_ms FROM wf_runs WHERE run_id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(run_row).transpose()
    }

    async fn history(&self, run_id: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query("SELECT event FROM wf_events WHERE run_id = $1 ORDER BY seq")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("event").map_err(StoreError::from))
            .collect()
    }

    async fn runs(
        &self,
        workflow: Option<&str>,
        status: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<RunRow>> {
        let rows = sqlx::query("SELECT run_id, workflow, version, status, state, seq, created_ms, updated_ms FROM wf_runs WHERE ($1 = '' OR workflow = $1) AND ($2 = '' OR status = $2) ORDER BY created_ms DESC, run_id LIMIT $3")
            .bind(workflow.unwrap_or(""))
            .bind(status.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(run_row).collect()
    }

    async fn due_timers(
        &self,
        now_ms: u64,
        limit: u32,
        node: Option<&str>,
    ) -> StoreResult<Vec<DueTimer>> {
        let rows = sqlx::query("SELECT run_id, timer, due_ms FROM wf_timers WHERE due_ms <= $1 AND ($3 = '' OR run_id IN (SELECT run_id FROM wf_runs WHERE owner = $3)) ORDER BY due_ms LIMIT $2")
            .bind(now_ms as i64)
            .bind(i64::from(limit))
            .bind(node.unwrap_or(""))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DueTimer {
                    run_id: r.try_get("run_id")?,
                    timer: r.try_get("timer")?,
                    due_ms: r.try_get::<i64, _>("due_ms")? as u64,
                })
            })
            .collect()
    }

    async fn next_timer(&self, node: Option<&str>) -> StoreResult<Option<u64>> {
        let row = sqlx::query("SELECT MIN(due_ms) AS due FROM wf_timers WHERE ($1 = '' OR run_id IN (SELECT run_id FROM wf_runs WHERE owner = $1))")
            .bind(node.unwrap_or(""))
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("due")?.map(|d| d as u64))
    }

    async fn outbox(&self, limit: u32, node: Option<&str>) -> StoreResult<Vec<OutboxEntry>> {
        let rows = sqlx::query(
            "SELECT run_id, key, dispatch FROM wf_outbox WHERE ($2 = '' OR run_id IN (SELECT run_id FROM wf_runs WHERE owner = $2)) ORDER BY run_id, key LIMIT $1",
        )
        .bind(i64::from(limit))
        .bind(node.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxEntry {
                    run_id: r.try_get("run_id")?,
                    key: r.try_get("key")?,
                    dispatch: r.try_get("dispatch")?,
                })
            })
            .collect()
    }

    async fn defer_timer(&self, run_id: &str, key: &str, due_ms: u64) -> StoreResult<()> {
        sqlx::query("UPDATE wf_timers SET due_ms = $1 WHERE run_id = $2 AND key = $3")
            .bind(due_ms as i64)
            .bind(run_id)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn clock_offset(&self) -> StoreResult<Option<(i64, u64)>> {
        if !self.postgres {
            return Ok(None);
        }
        let local_ms = || crate::coordinator::now_ms() as i64;
        let mut conn = self.pool.acquire().await?;
        let mut best: Option<(i64, u64)> = None;
        for _ in 0..3 {
            let before = local_ms();
            let row = sqlx::query(
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS now_ms",
            )
            .fetch_one(&mut *conn)
            .await?;
            let after = local_ms();
            let store: i64 = row.try_get("now_ms")?;
            let round_trip = (after - before).max(0) as u64;
            if best.is_none_or(|(_, rt)| round_trip < rt) {
                best = Some((store - (before + after) / 2, round_trip));
            }
        }
        Ok(best)
    }

    async fn counts(&self) -> StoreResult<(u64, u64)> {
        let runs = sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM wf_runs WHERE status NOT IN {TERMINAL}"
        ))
        .fetch_one(&self.pool)
        .await?
        .try_get::<i64, _>("n")?;
        let timers = sqlx::query("SELECT COUNT(*) AS n FROM wf_timers")
            .fetch_one(&self.pool)
            .await?
            .try_get::<i64, _>("n")?;
        Ok((runs as u64, timers as u64))
    }

    async fn purge_finished(&self, before_ms: u64) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let old =
            format!("SELECT run_id FROM wf_runs WHERE status IN {TERMINAL} AND updated_ms < $1");
        for table in ["wf_events", "wf_outbox", "wf_timers"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE run_id IN ({old})"))
                .bind(before_ms as i64)
                .execute(&mut *tx)
                .await?;
        }
        let gone = sqlx::query(&format!(
            "DELETE FROM wf_runs WHERE status IN {TERMINAL} AND updated_ms < $1"
        ))
        .bind(before_ms as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(gone)
    }
}
