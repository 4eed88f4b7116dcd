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
