//! One conformance suite for the workflow store, run on SQLite and on PostgreSQL.

use meshflow_control_plane::workflow::store::{
    Commit, NewRun, SqlStore, StoreError, WorkflowStore,
};

use crate::common::Postgres;

fn commit(run: &str, expected_seq: u64, events: &[&str], status: &str, now: u64) -> Commit {
    Commit {
        owner: None,
        run_id: run.into(),
        expected_seq,
        events: events.iter().map(|e| e.to_string()).collect(),
        state: format!("{{\"status\":\"{status}\"}}"),
        status: status.into(),
        now_ms: now,
        outbox: Vec::new(),
        timers: Vec::new(),
    }
}

async fn conformance(store: &dyn WorkflowStore) {
    // Definitions: an unchanged spec keeps its version.
    assert_eq!(
        store.put_definition("ns/a", "{\"v\":1}", 1).await.unwrap(),
        1
    );
    assert_eq!(
        store.put_definition("ns/a", "{\"v\":1}", 2).await.unwrap(),
        1
    );
    assert_eq!(
        store.put_definition("ns/a", "{\"v\":2}", 3).await.unwrap(),
        2
    );
    assert_eq!(
        store
            .definition("ns/a", None)
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        store
            .definition("ns/a", Some(1))
            .await
            .unwrap()
            .unwrap()
            .spec,
        "{\"v\":1}"
    );
    assert!(store.definition("ns/zz", None).await.unwrap().is_none());
    assert_eq!(store.definitions().await.unwrap().len(), 1);

    // Runs: creation is idempotent on the id.
    let mut first = commit("r1", 0, &["e1", "e2"], "Running", 10);
    first.outbox = vec![("s/1/0".into(), "d1".into())];
    first.timers = vec![("deadline/s/1/0".into(), "t1".into(), 500)];
    let new = NewRun {
        run_id: "r1".into(),
        workflow: "ns/a".into(),
        version: 2,
        commit: first,
    };
    assert!(store.create_run(&new).await.unwrap());
    assert!(
        !store.create_run(&new).await.unwrap(),
        "second create is a no-op"
    );
    let row = store.run("r1").await.unwrap().unwrap();
    assert_eq!(
        (row.seq, row.version, row.status.as_str()),
        (2, 2, "Running")
    );
    assert_eq!(store.outbox(10, None).await.unwrap().len(), 1);
    assert_eq!(store.next_timer(None).await.unwrap(), Some(500));
    assert!(store.due_timers(499, 10, None).await.unwrap().is_empty());
    assert_eq!(
        store.due_timers(500, 10, None).await.unwrap()[0].timer,
        "t1"
    );

    // A commit replaces outbox and timers and appends after the expected seq.
    let mut next = commit("r1", 2, &["e3"], "Running", 20);
    next.timers = vec![
        ("sleep/x".into(), "t2".into(), 900),
        ("run".into(), "t3".into(), 700),
    ];
    store.commit(&next).await.unwrap();
    assert!(store.outbox(10, None).await.unwrap().is_empty());
    let due: Vec<String> = store
        .due_timers(1000, 10, None)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.timer)
        .collect();
    assert_eq!(due, vec!["t3", "t2"], "earliest first");
    assert_eq!(store.history("r1").await.unwrap(), vec!["e1", "e2", "e3"]);
    // A writer with a stale view cannot commit, and nothing of it is written.
    let stale = commit("r1", 2, &["stale"], "Completed", 30);
    assert!(matches!(
        store.commit(&stale).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.history("r1").await.unwrap().len(), 3);
    assert_eq!(store.counts().await.unwrap(), (1, 2));

    // Listing and retention.
    store
        .commit(&commit("r1", 3, &["done"], "Completed", 40))
        .await
        .unwrap();
    let other = NewRun {
        run_id: "r2".into(),
        workflow: "ns/b".into(),
        version: 1,
        commit: commit("r2", 0, &["x"], "Running", 50),
    };
    store.create_run(&other).await.unwrap();
    assert_eq!(store.runs(Some("ns/a"), None, 10).await.unwrap().len(), 1);
    assert_eq!(
        store.runs(None, Some("Running"), 10).await.unwrap()[0].run_id,
        "r2"
    );
    assert_eq!(store.runs(None, None, 10).await.unwrap().len(), 2);
    assert_eq!(
        store.purge_finished(41).await.unwrap(),
        1,
        "r1 finished at 40"
    );
    assert!(store.run("r1").await.unwrap().is_none());
    assert!(store.history("r1").await.unwrap().is_empty());
    assert!(
        store.run("r2").await.unwrap().is_some(),
        "running runs are kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn store_conformance_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&format!("sqlite://{}", dir.path().join("wf.db").display()))
        .await
        .unwrap();
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn store_conformance_postgres() {
    let pg = Postgres::start();
    let store = SqlStore::open(&pg.url).await.unwrap();
    conformance(&store).await;
}

/// Group commit: while another connection holds the database's write lock, `n` good writes,
/// stale commits and repeated creates of the same runs queue up and are then written in shared
/// transactions. Each good write applies, each stale one is refused alone (its events never
/// appear), each repeated create is a no-op, and the writes really were grouped.
async fn grouped_writes(
    url: &str,
    lock: impl AsyncFnOnce() -> Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()>>,
) {
    use meshflow_control_plane::workflow::store::StoreOptions;
    use std::sync::Arc;
    let sizes = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
    let store = Arc::new(
        SqlStore::open_with(
            url,
            StoreOptions {
                commit_batch: 64,
                batch_sizes: Some(sizes.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let n = 12;
    let new_run = |i: usize| NewRun {
        run_id: format!("g{i:02}"),
        workflow: "ns/g".into(),
        version: 1,
        commit: commit(&format!("g{i:02}"), 0, &["start"], "Running", 1),
    };
    for i in 0..n {
        assert!(store.create_run(&new_run(i)).await.unwrap());
    }
    let release = lock().await;
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = store.clone();
        let good = commit(&format!("g{i:02}"), 1, &["good"], "Running", 2);
        tasks.push(tokio::spawn(async move {
            ("good", s.commit(&good).await.map(|_| true))
        }));
        let s = store.clone();
        let stale = commit(&format!("g{i:02}"), 0, &["stale"], "Failed", 2);
        tasks.push(tokio::spawn(async move {
            ("stale", s.commit(&stale).await.map(|_| true))
        }));
        let (s, again) = (store.clone(), new_run(i));
        tasks.push(tokio::spawn(async move {
            ("again", s.create_run(&again).await)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    release().await;
    for task in tasks {
        match task.await.unwrap() {
            ("good", outcome) => assert!(outcome.unwrap()),
            ("stale", outcome) => assert!(
                matches!(outcome, Err(StoreError::Conflict(_))),
                "a stale commit is refused: {outcome:?}"
            ),
            (_, outcome) => assert!(!outcome.unwrap(), "a repeated create is a no-op"),
        }
    }
    for i in 0..n {
        let id = format!("g{i:02}");
        assert_eq!(store.history(&id).await.unwrap(), ["start", "good"], "{id}");
        let row = store.run(&id).await.unwrap().unwrap();
        assert_eq!((row.seq, row.status.as_str()), (2, "Running"), "{id}");
    }
    assert!(
        sizes.get_sample_sum() > sizes.get_sample_count() as f64,
        "some transaction carried more than one write: {} writes in {} transactions",
        sizes.get_sample_sum(),
        sizes.get_sample_count()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grouped_writes_are_isolated_from_each_other_sqlite() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("wf.db").display());
    let lock_url = url.clone();
    grouped_writes(&url, async move || {
        let mut c = sqlx::SqliteConnection::connect(&lock_url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut c)
            .await
            .unwrap();
        Box::new(move || {
            Box::pin(async move {
                sqlx::query("COMMIT").execute(&mut c).await.unwrap();
            }) as futures::future::BoxFuture<'static, ()>
        }) as Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()>>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grouped_writes_are_isolated_from_each_other_postgres() {
    use sqlx::Connection;
    let pg = Postgres::start();
    let lock_url = pg.url.clone();
    grouped_writes(&pg.url, async move || {
        let mut c = sqlx::PgConnection::connect(&lock_url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut c).await.unwrap();
        sqlx::query("LOCK TABLE wf_runs IN EXCLUSIVE MODE")
            .execute(&mut c)
            .await
            .unwrap();
        Box::new(move || {
            Box::pin(async move {
                sqlx::query("COMMIT").execute(&mut c).await.unwrap();
            }) as futures::future::BoxFuture<'static, ()>
        }) as Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()>>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn store_conformance_memory() {
    // The in-memory store (tests, reference) keeps the same contract as SQLite and PostgreSQL.
    let store = meshflow_control_plane::workflow::memory::MemoryStore::new();
    conformance(&store).await;
}
