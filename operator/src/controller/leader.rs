//! Leader election: every replica computes, only the holder of the Lease writes.
//!
//! A small elector on a `coordination.k8s.io/v1` Lease, in the manner of client-go's
//! leaderelection (optimistic concurrency on the Lease's resourceVersion, expiry measured on
//! the local clock from when this replica last saw the Lease change):
//! - the holder renews every [`Timing::renew_period`] and steps down when no renewal has
//!   succeeded for [`Timing::renew_deadline`] (shorter than the lease, so it stops writing
//!   before anyone else may start);
//! - a standby reads the Lease every [`Timing::retry_period`] and takes it when it is free
//!   (released) or has not changed for its `leaseDurationSeconds` (the holder died);
//! - on shutdown the holder releases the Lease at once (no holder, a one-second duration), so
//!   a standby takes over at its next read instead of waiting for the Lease to expire.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Whether this replica may write to the API right now.
pub trait Leadership: Send + Sync {
    /// True while this replica holds the Lease.
    fn is_leader(&self) -> bool;
}

impl Leadership for watch::Receiver<bool> {
    fn is_leader(&self) -> bool {
        *self.borrow()
    }
}

impl Leadership for AtomicBool {
    fn is_leader(&self) -> bool {
        self.load(Ordering::Relaxed)
    }
}

/// A fixed answer (tests, or a single replica without election).
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub bool);

impl Leadership for Fixed {
    fn is_leader(&self) -> bool {
        self.0
    }
}

/// The timing of the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `leaseDurationSeconds` of the Lease: how long a standby waits for a silent holder
    /// (one killed without releasing) before it takes the Lease.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the holder renews.
    pub renew_period: Duration,
    /// How often a standby reads the Lease: the longest wait after a release.
    pub retry_period: Duration,
}

impl Timing {
    /// 15 s lease, 10 s renew deadline, renewals every 2 s, standby reads every 1 s.
    pub const DEFAULT: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        renew_period: Duration::from_secs(2),
        retry_period: Duration::from_secs(1),
    };
}

impl Default for Timing {
    fn default() -> Self {
        Timing::DEFAULT
    }
}

/// What to do with the Lease as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// There is no Lease: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// It is free (released, or expired): take it.
    Acquire,
    /// Another replica holds it.
    Standby,
}

/// Decide (pure): what `identity` does with `lease`, which has not changed for
/// `unchanged_for` as far as this replica has seen.
pub fn decide(
    lease: Option<&LeaseSpec>,
    identity: &str,
    unchanged_for: Duration,
    timing: &Timing,
) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::Acquire;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(timing.lease_duration, Duration::from_secs);
    if unchanged_for >= duration {
        Step::Acquire
    } else {
        Step::Standby
    }
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The resourceVersion of the Lease as last read, and when this replica first saw it.
    seen: Option<(String, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

fn is_status(e: &kube::Error, check: fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(status) if check(status))
}

impl Elector {
    /// An elector for the Lease `namespace/name` as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            seen: None,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// How long the Lease `lease` has been unchanged as far as this replica has seen.
    fn unchanged_for(&mut self, lease: &Lease) -> Duration {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match &self.seen {
            Some((v, at)) if *v == version => at.elapsed(),
            _ => {
                self.seen = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Reads the Lease and creates, renews or takes it when this replica may. `Ok(true)`: this
    /// replica holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let unchanged_for = lease
            .as_ref()
            .map_or(Duration::ZERO, |l| self.unchanged_for(l));
        let step = decide(
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            unchanged_for,
            &self.timing,
        );
        let at = now();
        let new = match (step, lease) {
            (Step::Standby, _) => return Ok(false),
            (Step::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        acquire_time: Some(at.clone()),
                        renew_time: Some(at),
                        lease_duration_seconds: Some(self.duration_seconds()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_status(&e, kube::core::Status::is_already_exists) => Ok(false),
                    Err(e) => Err(e),
                };
            }
            (Step::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(at);
                spec.lease_duration_seconds = Some(self.duration_seconds());
                lease
            }
            (Step::Acquire, Some(mut lease)) => {
                let duration = self.duration_seconds();
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(at.clone());
                spec.renew_time = Some(at);
                spec.lease_duration_seconds = Some(duration);
                spec.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                lease
            }
        };
        // A replace carries the resourceVersion read: if another replica wrote in between,
        // the API server answers Conflict and nobody takes the Lease twice.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &new)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, kube::core::Status::is_conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica holds it: no holder and a one-second duration, so a
    /// standby takes it at its next read.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        info!(lease = %self.name, "released the Lease");
        Ok(())
    }

    /// Runs the election until `stop` resolves or every receiver of `tx` is gone, then says
    /// "not leading" on `tx` and releases the Lease. `tx` carries whether this replica leads.
    /// Runs the election once `ready` resolves (a replica joins only once its watches have
    /// listed everything: a holder writing from stores that hold part of the cluster would undo
    /// what the cluster holds, and one whose watches never list would hold the Lease while
    /// writing nothing, keeping the replica that could out) until `stop` resolves or every
    /// receiver of `tx` is gone.
    pub async fn run(
        mut self,
        tx: watch::Sender<bool>,
        ready: impl Future<Output = ()>,
        stop: impl Future<Output = ()>,
    ) {
        let mut stop = std::pin::pin!(stop);
        tokio::select! {
            biased;
            () = &mut stop => return,
            () = tx.closed() => return,
            () = ready => info!(lease = %self.name, "caches synced; joining the election"),
        }
        let mut last_renewal: Option<Instant> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Some(Instant::now()),
                Ok(false) => last_renewal = None,
                Err(e) => {
                    warn!(lease = %self.name, error = %crate::error_chain(&e), "cannot read or write the Lease")
                }
            }
            let leading = last_renewal.is_some_and(|t| t.elapsed() < self.timing.renew_deadline);
            tx.send_if_modified(|l| {
                let changed = *l != leading;
                *l = leading;
                changed
            });
            let pause = if leading {
                self.timing.renew_period
            } else {
                self.timing.retry_period
            };
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = tx.closed() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        debug!(lease = %self.name, "leaving the election");
        // Writes stop before the Lease is free, so two replicas never write at once.
        tx.send_replace(false);
        if let Err(e) = self.release().await {
            warn!(lease = %self.name, error = %crate::error_chain(&e), "cannot release the Lease; the standby takes it when it expires");
        }
    }
}

/// Joins the election for the Lease `namespace/name` as `identity` with [`Timing::DEFAULT`]
/// once `ready` resolves. The receiver says whether this replica leads; the task keeps renewing
/// (or trying to acquire) the Lease until `stop` resolves (SIGTERM: the Lease goes at once,
/// while the controllers still drain) or every receiver is dropped, then releases it.
pub fn elect(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    ready: impl Future<Output = ()> + Send + 'static,
    stop: impl Future<Output = ()> + Send + 'static,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let elector = Elector::new(client, namespace, name, identity, Timing::DEFAULT);
    let (tx, rx) = watch::channel(false);
    (rx, tokio::spawn(elector.run(tx, ready, stop)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, seconds: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }
    }

    const T: Timing = Timing::DEFAULT;

    #[test]
    fn a_missing_lease_is_created() {
        assert_eq!(decide(None, "a", Duration::ZERO, &T), Step::Create);
    }

    #[test]
    fn the_holder_renews() {
        let l = held_by(Some("a"), Some(15));
        assert_eq!(
            decide(Some(&l), "a", Duration::from_secs(60), &T),
            Step::Renew
        );
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        for l in [held_by(None, Some(1)), held_by(Some(""), Some(1))] {
            assert_eq!(decide(Some(&l), "b", Duration::ZERO, &T), Step::Acquire);
        }
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stayed_unchanged_for_its_duration() {
        let l = held_by(Some("a"), Some(15));
        assert_eq!(
            decide(Some(&l), "b", Duration::from_secs(14), &T),
            Step::Standby
        );
        assert_eq!(
            decide(Some(&l), "b", Duration::from_secs(15), &T),
            Step::Acquire
        );
        // Without a duration, the elector's own applies.
        let l = held_by(Some("a"), None);
        assert_eq!(
            decide(Some(&l), "b", Duration::from_secs(14), &T),
            Step::Standby
        );
    }

    #[test]
    fn the_default_timing_steps_down_before_a_standby_may_take_over() {
        assert!(T.renew_deadline < T.lease_duration);
        assert!(T.renew_period < T.renew_deadline);
        assert!(T.retry_period < Duration::from_secs(2));
    }
}
