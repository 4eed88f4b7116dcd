//! [`MemoryStore`]: the [`WorkflowStore`] contract in memory — for unit tests of the
//! coordinator and the engine without a database, and as the reference the SQL store is
//! compared with (the same conformance suite runs on both). Not durable: everything is lost
//! with the process, so it is never a production choice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::store::{
    Commit, DefinitionRow, DueTimer, NewRun, OutboxEntry, RunRow, StoreError, StoreResult,
    WorkflowStore,
};

/// Statuses of finished runs (as the SQL store's `TERMINAL`).
const TERMINAL: [&str; 8] = [
    "Completed",
    "Failed",
    "Compensated",
    "CompensationFailed",
    "Cancelled",
    "Terminated",
    "TimedOut",
    "HistoryLimitExceeded",
];

fn terminal(status: &str) -> bool {
    TERMINAL.contains(&status)
}

struct StoredRun {
    row: RunRow,
    owner: String,
    lease_until_ms: u64,
    fence: u64,
}

#[derive(Default)]
struct Tables {
    /// Versions of each definition, oldest first.
    definitions: BTreeMap<String, Vec<DefinitionRow>>,
    runs: BTreeMap<String, StoredRun>,
    events: HashMap<String, Vec<String>>,
    /// (run, key) → dispatch JSON.
    outbox: BTreeMap<(String, String), String>,
    /// (run, key) → (timer JSON, due Unix ms).
    timers: BTreeMap<(String, String), (String, u64)>,
}

impl Tables {
    /// Whether `run_id` passes the `node` filter (`None` or empty: every run, as in SQL).
    fn owned_by(&self, run_id: &str, node: Option<&str>) -> bool {
        node.filter(|n| !n.is_empty())
            .is_none_or(|n| self.runs.get(run_id).is_some_and(|r| r.owner == n))
    }

    /// Appends the events and replaces the outbox and timers of `commit`'s run.
    fn write_changes(&mut self, commit: &Commit) {
        self.events
            .entry(commit.run_id.clone())
            .or_default()
            .extend(commit.events.iter().cloned());
        self.outbox.retain(|(run, _), _| run != &commit.run_id);
        for (key, dispatch) in &commit.outbox {
            self.outbox
                .insert((commit.run_id.clone(), key.clone()), dispatch.clone());
        }
        self.timers.retain(|(run, _), _| run != &commit.run_id);
        for (key, timer, due) in &commit.timers {
            self.timers
                .insert((commit.run_id.clone(), key.clone()), (timer.clone(), *due));
        }
    }
}

/// A [`WorkflowStore`] in memory (one mutex over every table: each call is one atomic step,
/// like one SQL transaction).
#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl WorkflowStore for MemoryStore {
    async fn put_definition(&self, workflow: &str, spec: &str, now_ms: u64) -> StoreResult<u32> {
        let mut t = self.tables();
        let versions = t.definitions.entry(workflow.to_string()).or_default();
        if let Some(latest) = versions.last() {
            if latest.spec == spec {
                return Ok(latest.version);
            }
        }
        let version = versions.last().map_or(1, |d| d.version + 1);
        versions.push(DefinitionRow {
            workflow: workflow.to_string(),
            version,
            spec: spec.to_string(),
            created_ms: now_ms,
        });
        Ok(version)
    }

    async fn definition(
        &self,
        workflow: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<DefinitionRow>> {
        let t = self.tables();
        let Some(versions) = t.definitions.get(workflow) else {
            return Ok(None);
        };
        Ok(match version {
            Some(v) => versions.iter().find(|d| d.version == v).cloned(),
            None => versions.last().cloned(),
        })
    }

    async fn definitions(&self) -> StoreResult<Vec<DefinitionRow>> {
        Ok(self
            .tables()
            .definitions
            .values()
            .filter_map(|v| v.last().cloned())
            .collect())
    }

    async fn create_run(&self, run: &NewRun) -> StoreResult<bool> {
        let mut t = self.tables();
        if t.runs.contains_key(&run.run_id) {
            return Ok(false);
        }
        let (owner, lease_until_ms, fence) = match &run.commit.owner {
            Some(o) => (o.node.clone(), o.lease_until_ms, o.fence),
            None => (String::new(), 0, 0),
        };
        t.runs.insert(
            run.run_id.clone(),
            StoredRun {
                row: RunRow {
                    run_id: run.run_id.clone(),
                    workflow: run.workflow.clone(),
                    version: run.version,
                    status: run.commit.status.clone(),
                    state: run.commit.state.clone(),
                    seq: run.commit.events.len() as u64,
                    created_ms: run.commit.now_ms,
                    updated_ms: run.commit.now_ms,
                },
                owner,
                lease_until_ms,
                fence,
            },
        );
        t.write_changes(&run.commit);
        Ok(true)
    }

    async fn commit(&self, commit: &Commit) -> StoreResult<()> {
        let mut t = self.tables();
        let Some(run) = t.runs.get_mut(&commit.run_id) else {
            return Err(StoreError::Conflict(commit.run_id.clone()));
        };
        if let Some(o) = &commit.owner {
            if run.owner != o.node || run.fence != o.fence {
                return Err(StoreError::Fenced(commit.run_id.clone()));
            }
        }
        if run.row.seq != commit.expected_seq {
            return Err(StoreError::Conflict(commit.run_id.clone()));
        }
        if let Some(o) = &commit.owner {
            run.lease_until_ms = run.lease_until_ms.max(o.lease_until_ms);
        }
        run.row.seq = commit.expected_seq + commit.events.len() as u64;
        run.row.state = commit.state.clone();
        run.row.status = commit.status.clone();
        run.row.updated_ms = commit.now_ms;
        t.write_changes(commit);
        Ok(())
    }

    async fn run(&self, run_id: &str) -> StoreResult<Option<RunRow>> {
        Ok(self.tables().runs.get(run_id).map(|r| r.row.clone()))
    }

    async fn history(&self, run_id: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .tables()
            .events
            .get(run_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn runs(
        &self,
        workflow: Option<&str>,
        status: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<RunRow>> {
        let t = self.tables();
        let mut rows: Vec<RunRow> = t
            .runs
            .values()
            .map(|r| &r.row)
            .filter(|r| workflow.is_none_or(|w| w.is_empty() || r.workflow == w))
            .filter(|r| status.is_none_or(|s| s.is_empty() || r.status == s))
            .cloned()
            .collect();
        rows.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then_with(|| a.run_id.cmp(&b.run_id))
        });
        rows.truncate(limit as usize);
        Ok(rows)
    }

    async fn due_timers(
        &self,
        now_ms: u64,
        limit: u32,
        node: Option<&str>,
    ) -> StoreResult<Vec<DueTimer>> {
        let t = self.tables();
        let mut due: Vec<DueTimer> = t
            .timers
            .iter()
            .filter(|((run, _), (_, due))| *due <= now_ms && t.owned_by(run, node))
            .map(|((run, _), (timer, due))| DueTimer {
                run_id: run.clone(),
                timer: timer.clone(),
                due_ms: *due,
            })
            .collect();
        due.sort_by_key(|d| d.due_ms);
        due.truncate(limit as usize);
        Ok(due)
    }

    async fn next_timer(&self, node: Option<&str>) -> StoreResult<Option<u64>> {
        let t = self.tables();
        Ok(t.timers
            .iter()
            .filter(|((run, _), _)| t.owned_by(run, node))
            .map(|(_, (_, due))| *due)
            .min())
    }

    async fn outbox(&self, limit: u32, node: Option<&str>) -> StoreResult<Vec<OutboxEntry>> {
        let t = self.tables();
        Ok(t.outbox
            .iter()
            .filter(|((run, _), _)| t.owned_by(run, node))
            .take(limit as usize)
            .map(|((run, key), dispatch)| OutboxEntry {
                run_id: run.clone(),
                key: key.clone(),
                dispatch: dispatch.clone(),
            })
            .collect())
    }

    async fn purge_finished(&self, before_ms: u64) -> StoreResult<u64> {
        let mut t = self.tables();
        let old: Vec<String> = t
            .runs
            .values()
            .filter(|r| terminal(&r.row.status) && r.row.updated_ms < before_ms)
            .map(|r| r.row.run_id.clone())
            .collect();
        for id in &old {
            t.runs.remove(id);
            t.events.remove(id);
            t.outbox.retain(|(run, _), _| run != id);
            t.timers.retain(|(run, _), _| run != id);
        }
        Ok(old.len() as u64)
    }

    async fn counts(&self) -> StoreResult<(u64, u64)> {
        let t = self.tables();
        let runs = t.runs.values().filter(|r| !terminal(&r.row.status)).count();
        Ok((runs as u64, t.timers.len() as u64))
    }

    async fn acquire(
        &self,
        node: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<(String, u64)>> {
        let mut t = self.tables();
        let mut held = Vec::new();
        for run in t.runs.values_mut() {
            if held.len() >= limit as usize {
                break;
            }
            let free = run.owner == node || run.owner.is_empty() || run.lease_until_ms < now_ms;
            if terminal(&run.row.status) || !free {
                continue;
            }
            if run.owner != node {
                run.fence += 1;
            }
            run.owner = node.to_string();
            run.lease_until_ms = lease_until_ms;
            held.push((run.row.run_id.clone(), run.fence));
        }
        Ok(held)
    }

    async fn owned_by(&self, node: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .tables()
            .runs
            .values()
            .filter(|r| r.owner == node && !terminal(&r.row.status))
            .map(|r| r.row.run_id.clone())
            .collect())
    }

    async fn defer_timer(&self, run_id: &str, key: &str, due_ms: u64) -> StoreResult<()> {
        if let Some((_, due)) = self
            .tables()
            .timers
            .get_mut(&(run_id.to_string(), key.to_string()))
        {
            *due = due_ms;
        }
        Ok(())
    }

    async fn clock_offset(&self) -> StoreResult<Option<(i64, u64)>> {
        Ok(None)
    }
}
