//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does
//! it: the holder renews every third of the lease duration; another replica takes the lease
//! over when its record has not changed for a whole lease duration *as observed by that
//! replica's own monotonic clock* (so clock skew between replicas does not matter). Only the
//! leader writes status; every replica serves config.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::watch;

/// The Lease's name (in the control plane's namespace).
pub const LEASE_NAME: &str = "meshflow-control-plane";

/// Runs forever: keeps `leader` true while this replica (`holder`) holds the Lease
/// `namespace/LEASE_NAME`, false otherwise. A leader that cannot renew for a whole lease
/// duration steps down before another may take over.
pub async fn run(
    client: Client,
    namespace: String,
    holder: String,
    duration: Duration,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let seconds = duration.as_secs().max(1) as i32;
    let renew_every = duration / 3;
    // The other holder's record as last seen, and since when (monotonic).
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renewed = Instant::now();
    loop {
        let holding = *leader.borrow();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let result: Result<bool, kube::Error> = async {
            match api.get_opt(LEASE_NAME).await? {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(LEASE_NAME.into()),
                            ..Default::default()
                        },
                        spec: Some(LeaseSpec {
                            holder_identity: Some(holder.clone()),
                            lease_duration_seconds: Some(seconds),
                            acquire_time: Some(now.clone()),
                            renew_time: Some(now.clone()),
                            lease_transitions: Some(0),
                            ..Default::default()
                        }),
                    };
                    api.create(&PostParams::default(), &lease).await?;
                    Ok(true)
                }
                Some(mut lease) => {
                    let spec = lease.spec.get_or_insert_with(Default::default);
                    let current = spec.holder_identity.clone().unwrap_or_default();
                    let version = lease.metadata.resource_version.clone().unwrap_or_default();
                    if current == holder {
                        spec.renew_time = Some(now.clone());
                        spec.lease_duration_seconds = Some(seconds);
                        api.replace(LEASE_NAME, &PostParams::default(), &lease)
                            .await?;
                        return Ok(true);
                    }
                    // Someone else's (or nobody's) record: free once unchanged for a duration.
                    let since = match &observed {
                        Some((v, at)) if *v == version => *at,
                        _ => {
                            observed = Some((version.clone(), Instant::now()));
                            Instant::now()
                        }
                    };
                    let held_for = spec
                        .lease_duration_seconds
                        .map_or(duration, |s| Duration::from_secs(s.max(1) as u64));
                    if !current.is_empty() && since.elapsed() < held_for {
                        return Ok(false);
                    }
                    spec.holder_identity = Some(holder.clone());
                    spec.lease_duration_seconds = Some(seconds);
                    spec.acquire_time = Some(now.clone());
                    spec.renew_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    // `replace` carries the resourceVersion read above: if another replica
                    // took it meanwhile, this fails with 409 and we stay a follower.
                    api.replace(LEASE_NAME, &PostParams::default(), &lease)
                        .await?;
                    tracing::info!(previous = %current, "took over the control-plane lease");
                    Ok(true)
                }
            }
        }
        .await;
        match result {
            Ok(true) => {
                last_renewed = Instant::now();
                if !holding {
                    tracing::info!(%holder, "leader: this replica writes status");
                }
                leader.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(false) => {
                if holding {
                    tracing::warn!("lost the control-plane lease");
                }
                leader.send_if_modified(|l| std::mem::replace(l, false));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control-plane lease");
                // Step down before anyone else may take over.
                if holding && last_renewed.elapsed() >= duration.saturating_sub(renew_every) {
                    tracing::warn!("could not renew the control-plane lease: stepping down");
                    leader.send_if_modified(|l| std::mem::replace(l, false));
                }
            }
        }
        tokio::time::sleep(if *leader.borrow() {
            renew_every
        } else {
            renew_every.min(Duration::from_secs(1))
        })
        .await;
    }
}
