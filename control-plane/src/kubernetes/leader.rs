//! Leader election over a `coordination.k8s.io/v1` Lease, by the `kube-lease-manager` crate
//! (server-side apply, so two replicas can never both take the lock). Only the leader writes
//! status; every replica serves config. The holder renews before `duration - grace` is over; a
//! dead holder's lease is taken over once `duration` has passed since its last renewal.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseParams};
use tokio::sync::watch;

/// The Lease's name (in the control plane's namespace).
pub const LEASE_NAME: &str = "meshflow-control-plane";

/// Runs forever: keeps `leader` true while this replica (`holder`) holds the Lease
/// `namespace/LEASE_NAME` (`duration` whole seconds, at least 2), false otherwise. When the
/// lease manager fails (the API server unreachable), this replica stops leading and tries again.
pub async fn run(
    client: Client,
    namespace: String,
    holder: String,
    duration: Duration,
    leader: watch::Sender<bool>,
) {
    let seconds = duration.as_secs().max(2);
    // Renew a third of the duration before it runs out.
    let grace = (seconds / 3).max(1);
    loop {
        let manager = LeaseManager::new(
            client.clone(),
            LEASE_NAME,
            namespace.clone(),
            LeaseParams::new(holder.clone(), seconds, grace),
            LeaseCreateMode::AutoCreate,
        )
        .await;
        let manager = match manager {
            Ok(manager) => manager,
            Err(e) => {
                tracing::warn!(error = %e, "control-plane lease");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (mut state, task) = manager.watch().await;
        loop {
            let leading = *state.borrow_and_update();
            if leader.send_if_modified(|l| std::mem::replace(l, leading) != leading) {
                if leading {
                    tracing::info!(%holder, "leader: this replica writes status");
                } else {
                    tracing::warn!(%holder, "no longer the leader");
                }
            }
            if state.changed().await.is_err() {
                break;
            }
        }
        leader.send_if_modified(|l| std::mem::replace(l, false));
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "control-plane lease manager stopped"),
            Err(e) => tracing::warn!(error = %e, "control-plane lease manager panicked"),
            Ok(Ok(_)) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
