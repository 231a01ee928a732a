//! weft's operator: the node agent (`weft-operator agent`) and, in cluster mode, the controller
//! and the cluster trace. The lab (`weft-lab`, its own crate) builds on the `model`, `policy`
//! and `agent` modules here.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod model;
pub mod policy;
pub mod uninstall;

pub use weft_dataplane::error_chain;

/// This host's name (the default node name and controller identity); `localhost` when unknown.
pub(crate) fn default_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The operator's one retry delay: 1 s, doubling after each failure up to `max`, without
/// jitter and without end. Build it (`backon::BackoffBuilder::build`) once per run of
/// failures; each `next()` is the delay before the next try.
pub(crate) const fn backoff(max: std::time::Duration) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::new()
        .with_min_delay(std::time::Duration::from_secs(1))
        .with_max_delay(max)
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder as _;
    use std::time::Duration;

    fn secs(max: Duration, n: usize) -> Vec<u64> {
        super::backoff(max)
            .build()
            .take(n)
            .map(|d| d.as_secs())
            .collect()
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_each_callers_cap() {
        // The agent's reconcile retry.
        assert_eq!(
            secs(Duration::from_secs(30), 8),
            [1, 2, 4, 8, 16, 30, 30, 30]
        );
        // The agent's NodeNetwork status writer.
        assert_eq!(
            secs(crate::agent::kube::MAX_STATUS_BACKOFF, 8),
            [1, 2, 4, 8, 16, 32, 60, 60]
        );
        // The controllers' requeue after a transient error.
        assert_eq!(
            secs(crate::controller::MAX_BACKOFF, 11),
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
        );
        // It never ends.
        assert_eq!(
            super::backoff(Duration::from_secs(30)).build().nth(10_000),
            Some(Duration::from_secs(30))
        );
    }
}
